"""What the commands share: the typer app, common flags, prompt reading, sampling and loading."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from ..errors import KVPredError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="KV Prediction on MLX: a small aux model prefills the prompt, learned linear maps predict "
                       "the base model's KV cache, the base generates. Faster time to first token.")


def log_progress(description: str, total: int, *, parts: int = 10) -> Callable[[int], None]:
    """advance(n) for a log file, where a bar shows nothing: a line at each tenth of `total`, with the time taken."""
    start, done, shown = time.monotonic(), 0, 0

    def advance(n: int = 1) -> None:
        nonlocal done, shown
        done += n
        part = min(done, total) * parts // max(total, 1)
        if part > shown:
            shown = part
            elapsed = int(time.monotonic() - start)
            print(f"{description} {min(done, total)}/{total} ({elapsed // 60}:{elapsed % 60:02d})", file=sys.stderr,
                  flush=True)

    return advance


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
    from ..pipeline import require_text

    return require_text(content, "--text" if text is not None else prompt)


# Options shared by generate and chat
MODEL = typer.Option(None, help="Base model: .gguf file, mlx-lm dir or HF repo id (default: installed "
                                "SmolLM2-135M-Instruct GGUF).")
KVP = typer.Option(None, help="KVP bundle: a directory or a Hugging Face Hub repo id (org/name, fetched into the Hub "
                               "cache; HF_HUB_OFFLINE=1 reads the cache only). Default: the shipped bundle for the "
                               "default model.")
MODE = typer.Option("auto", help="kvp (aux prefill + predicted cache), base (plain base), aux (aux alone, generate "
                                 "only), specprefill (the base prefills only the prompt positions its question "
                                 "attends to most: SpecPrefill; generate only), auto (kvp only where it saves real "
                                 "time on this device, else base).")
MAX_TOKENS = typer.Option(256, "--max-tokens", "-m", help="Maximum new tokens.")
TEMP = typer.Option(0.0, help="Sampling temperature; 0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold.")
SEED = typer.Option(None, help="Random seed for sampling.")
SYSTEM = typer.Option(None, help="System message.")
DEVICE = typer.Option(None, help="cpu or gpu (default: gpu if MLX has one, else cpu).")
ALLOW_UNTRAINED = typer.Option(False, help="Accept a bundle whose predictor was never trained.")
EXACT_TAIL = typer.Option(None, help="kvp: the base computes the last N prompt tokens itself, attending to the "
                                     "predicted cache of the rest (default 32; 1: the last token only, the paper's).")
EXACT_HEAD = typer.Option(None, help="kvp: the base computes the first N prompt tokens itself (default 1: the "
                                     "attention sink, cached after first use; 0: predict every position).")
EXACT_KEEP = typer.Option(None, help="kvp: the base also recomputes this fraction of the predicted positions, those "
                                     "the exact tail attends to most in the aux's layers (default 0; 0.1 costs about "
                                     "6% of a base prefill).")
KEEP = typer.Option(None, help="specprefill: the fraction of the prompt before the exact tail the base prefills "
                               "(default 0.3).")
KVP_MIN_TOKENS = typer.Option(None, help="auto: the base runs prompts (or new turn spans) shorter than this (default: "
                                         "where kvp's TTFT, modelled from a one-time speed probe, is 1.5x lower).")
TTFT_BUDGET = typer.Option(None, help="auto: run the base (exact) whenever its modelled TTFT is within this many "
                                      "seconds.")


def sampler_from_flags(temp: float, top_p: float, seed: Optional[int], max_tokens: int):
    """make_sampler after checking the flags (and seeding)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    if max_tokens < 1:
        raise KVPredError(f"--max-tokens must be >= 1, got {max_tokens}")
    if temp < 0 or not 0 < top_p <= 1:
        raise KVPredError("--temp must be >= 0 and --top-p in (0, 1]")
    if seed is not None:
        mx.random.seed(seed)
    return make_sampler(temp=temp, top_p=top_p)


def check_policy_flags(exact_tail: Optional[int], kvp_min_tokens: Optional[int], ttft_budget: Optional[float]) -> int:
    """The exact tail to use (default 32), after checking the auto-policy flags."""
    from ..pipeline import DEFAULT_EXACT_TAIL

    if exact_tail is not None and exact_tail < 1:
        raise KVPredError(f"--exact-tail must be >= 1 (the base computes at least the last prompt token), "
                          f"got {exact_tail}")
    if kvp_min_tokens is not None and kvp_min_tokens < 1:
        raise KVPredError(f"--kvp-min-tokens must be >= 1, got {kvp_min_tokens}")
    if ttft_budget is not None and ttft_budget < 0:
        raise KVPredError(f"--ttft-budget must be >= 0 seconds, got {ttft_budget}")
    return DEFAULT_EXACT_TAIL if exact_tail is None else exact_tail


def load_for_generation(model, kvp, mode: str, device, allow_untrained: bool, *, keep_bundle: bool = False,
                        exact_head: Optional[int] = None, keep: Optional[float] = None,
                        exact_keep: Optional[float] = None):
    """load_pipeline for a mode (base: no bundle, unless `keep_bundle`), with the notes a user should see."""
    from ..pipeline import check_mode, load_pipeline

    check_mode(mode)
    pipe = load_pipeline(model, kvp=False if mode == "base" and not keep_bundle else kvp, device=device,
                         allow_untrained=allow_untrained, exact_head=exact_head, keep=keep, exact_keep=exact_keep)
    if mode == "auto" and pipe.bundle is None:
        print("note: no KVP bundle for this model (--kvp DIR); running the base model alone", file=sys.stderr)
    if pipe.bundle is not None and not pipe.bundle.config.trained:
        print("WARNING: this KVP bundle is UNTRAINED; its outputs are not meaningful", file=sys.stderr)
    return pipe




def print_stream(responses):
    last = None
    for last in responses:
        print(last.text, end="", flush=True)
    print()
    return last




def parse_int_list(value: Optional[str], flag: str) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise KVPredError(f"{flag} must be comma-separated integers, got {value!r}") from None


def parse_fraction_list(value: Optional[str], flag: str) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        fractions = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise KVPredError(f"{flag} must be comma-separated fractions in 0..1, got {value!r}") from None
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise KVPredError(f"{flag} must be comma-separated fractions in 0..1, got {value!r}")
    return fractions
