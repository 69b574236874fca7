"""Mode "auto": kvp only where it saves real time on this device, the base (exact) everywhere else.

The TTFT of each mode for a span of new tokens is modelled as fixed cost + FLOPs / rate. The fixed cost and rate of
base prefill and of aux prefill + prediction are measured once per model, bundle and machine by a probe of a few
seconds (two prompt lengths per mode), and cached as JSON in the user cache dir ($KVPRED_MLX_CACHE_DIR to move it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import mlx.core as mx

from .atomic import atomic_write
from .bundle import bundle_id, describe_base
from .flops import exact_keep_flops, lm_head_flops, predictor_flops, span_flops

if TYPE_CHECKING:
    from .pipeline import Pipeline

# The default --kvp-min-tokens: the shortest prompt whose modelled kvp TTFT is this many times lower than the
# base's. Below it kvp saves too little time to be worth its approximate cache.
KVP_MIN_SPEEDUP = 1.5
# The probe's prompt lengths: the longer one past the C rows' 256, so that its rates hold for long prompts (16 and
# 192 modelled kvp 2.34-2.42x at 1024 tokens where bench measured 2.17x; 16 and 512: 2.20-2.22x; a 6 s probe)
PROBE_LENGTHS = (16, 512)
PROBE_KEEP = 0.1  # the exact keep the probe times (at the longer length, exact tail 32) for keep_fixed_s
PROBE_TAIL = 32
RATES_FILE = "prefill-rates.json"


@dataclass
class PrefillRates:
    """Measured prefill cost on this device: seconds = fixed + FLOPs / (GFLOP/s * 1e9)."""

    base_fixed_s: float
    base_gflops: float
    aux_fixed_s: float  # aux prefill + predictor + writing the predicted cache
    aux_gflops: float
    keep_fixed_s: float  # exact keep beyond its recompute's FLOPs: the tail's scoring pass, the recompute's calls


@dataclass
class ModeChoice:
    """The mode that runs a span of new tokens, why, and the modelled TTFT of both (None: not modelled)."""

    mode: str
    reason: str
    base_s: float | None = None
    kvp_s: float | None = None
    kvp_min_tokens: int | None = None


def base_time(pipe: "Pipeline", rates: PrefillRates, new_tokens: int, offset: int = 0) -> float:
    """Modelled TTFT of the base over `new_tokens` after `offset` cached tokens."""
    flops = span_flops(pipe.base.model, new_tokens, offset) + lm_head_flops(pipe.base.config)
    return rates.base_fixed_s + flops / (rates.base_gflops * 1e9)


def kvp_time(pipe: "Pipeline", rates: PrefillRates, new_tokens: int, offset: int = 0, *, exact_tail: int = 1,
             aux_lag: int = 0, exact_keep: float = 0.0) -> float:
    """Modelled TTFT of kvp: the aux catches up on `aux_lag` tokens it has not seen and runs the new ones but the
    exact tail, the predictor maps them, the base recomputes the `exact_keep` fraction of them from the first layer
    the aux does not share, and runs the tail."""
    tail = min(exact_tail, new_tokens)
    predicted = new_tokens - tail
    if predicted == 0:
        return base_time(pipe, rates, new_tokens, offset)
    bundle = pipe.bundle
    aux_flops = (span_flops(bundle.aux, aux_lag + predicted, offset - aux_lag)
                 + predictor_flops(bundle.predictor, predicted))
    recompute_s = exact_keep_flops(pipe.base.model, bundle, predicted, exact_keep, offset + predicted) \
        / (rates.base_gflops * 1e9)
    return (rates.aux_fixed_s + aux_flops / (rates.aux_gflops * 1e9) + recompute_s
            + (rates.keep_fixed_s if exact_keep > 0 else 0.0) + base_time(pipe, rates, tail, offset + predicted))


def default_kvp_min_tokens(pipe: "Pipeline", rates: PrefillRates, *, exact_tail: int, exact_keep: float = 0.0) -> int:
    """The shortest prompt whose modelled kvp TTFT is KVP_MIN_SPEEDUP times lower than the base's (bisection:
    the speedup grows with the prompt length); the context length when no prompt gets there."""
    limit = pipe.context_length or 32768

    def fast_enough(n: int) -> bool:
        return base_time(pipe, rates, n) >= KVP_MIN_SPEEDUP * kvp_time(pipe, rates, n, exact_tail=exact_tail,
                                                                       exact_keep=exact_keep)

    if not fast_enough(limit):
        return limit
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fast_enough(mid) else (mid + 1, hi)
    return lo


def choose_auto(pipe: "Pipeline", rates: PrefillRates, *, new_tokens: int, offset: int = 0, aux_lag: int = 0,
                exact_tail: int = 1, kvp_min_tokens: int | None = None, ttft_budget: float | None = None,
                exact_keep: float = 0.0) -> ModeChoice:
    """kvp or base for `new_tokens` after `offset` cached ones: base below `kvp_min_tokens` (default: from the
    measured rates), when the base's modelled TTFT fits `ttft_budget` seconds, or when kvp (recomputing the
    `exact_keep` fraction) would not be faster."""
    if kvp_min_tokens is None:
        kvp_min_tokens = default_kvp_min_tokens(pipe, rates, exact_tail=exact_tail, exact_keep=exact_keep)
    t_base = base_time(pipe, rates, new_tokens, offset)
    t_kvp = kvp_time(pipe, rates, new_tokens, offset, exact_tail=exact_tail, aux_lag=aux_lag, exact_keep=exact_keep)
    choice = dict(base_s=t_base, kvp_s=t_kvp, kvp_min_tokens=kvp_min_tokens)
    if new_tokens < kvp_min_tokens:
        return ModeChoice("base", f"{new_tokens} new tokens < --kvp-min-tokens {kvp_min_tokens}", **choice)
    if ttft_budget is not None and t_base <= ttft_budget:
        return ModeChoice("base", f"the base fits --ttft-budget {ttft_budget:g} s", **choice)
    if t_kvp >= t_base:
        return ModeChoice("base", "kvp would not be faster", **choice)
    return ModeChoice("kvp", f"{new_tokens} new tokens >= --kvp-min-tokens {kvp_min_tokens}", **choice)


def prefill_rates(pipe: "Pipeline", *, generation: Callable) -> PrefillRates:
    """The pipeline's prefill rates: kept on it, else read from the cache file, else measured with `generation`
    (pipeline.generate_tokens: the real generation paths) and saved."""
    if pipe.prefill_rates is not None:
        return pipe.prefill_rates
    key = _rates_key(pipe)
    path = cache_dir() / RATES_FILE
    stored = _read_rates_file(path)
    if key in stored:
        try:
            pipe.prefill_rates = PrefillRates(**stored[key])
            return pipe.prefill_rates
        except TypeError:
            pass  # an older layout: measure again
    print("auto mode: measuring prefill speed on this device (once per model and bundle)...", file=sys.stderr)
    pipe.prefill_rates = measure_prefill_rates(pipe, generation=generation)
    stored[key] = asdict(pipe.prefill_rates)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(stored, indent=1)))
    return pipe.prefill_rates


def measure_prefill_rates(pipe: "Pipeline", *, generation: Callable, lengths: tuple[int, int] = PROBE_LENGTHS,
                          repeats: int = 3) -> PrefillRates:
    """Time base and kvp (exact tail 1, no exact keep: kvp_time adds its recompute) to the first token at two
    prompt lengths (best of `repeats`, after a warm-up) and fit fixed + FLOPs / rate to each; the kvp fit subtracts
    the modelled base last-token step. Where the bundle takes an exact keep (pipeline.keeps_exact), kvp with and
    without PROBE_KEEP at the longer length (exact tail PROBE_TAIL) give its fixed cost beyond the recompute's
    FLOPs. The runs alternate between the modes, so a moment when the machine is busy slows both rather than one."""
    from .pipeline import keeps_exact

    vocab = pipe.base.config["vocab_size"]
    prompts = [mx.random.randint(0, vocab, (n,), key=mx.random.key(n)) for n in lengths]

    def best_ttfts(prompt: mx.array, repeats: int, runs: dict[str, dict]) -> dict[str, float]:
        best = {name: float("inf") for name in runs}
        for _ in range(repeats):
            for name, options in runs.items():
                tic = time.perf_counter()
                next(iter(generation(pipe, prompt, max_tokens=1, **options)))
                best[name] = min(best[name], time.perf_counter() - tic)
        return best

    plain = {mode: dict(mode=mode, exact_tail=1, exact_keep=0.0) for mode in ("base", "kvp")}
    best_ttfts(prompts[0][:4], 1, plain)  # warm-up: first-call allocations
    times = [best_ttfts(p, repeats, plain) for p in prompts]
    base_flops = [span_flops(pipe.base.model, n, 0) + lm_head_flops(pipe.base.config) for n in lengths]
    base_fixed, base_gflops = _fit(base_flops, [t["base"] for t in times])
    base_rates = PrefillRates(base_fixed, base_gflops, 0.0, 1.0, 0.0)
    aux_flops = [span_flops(pipe.bundle.aux, n - 1, 0) + predictor_flops(pipe.bundle.predictor, n - 1)
                 for n in lengths]
    aux_s = [t["kvp"] - base_time(pipe, base_rates, 1, n - 1) for t, n in zip(times, lengths)]
    aux_fixed, aux_gflops = _fit(aux_flops, aux_s)
    keep_fixed = 0.0
    if keeps_exact(pipe):
        n = lengths[1]
        kept = best_ttfts(prompts[1], repeats, {"kvp": dict(mode="kvp", exact_tail=PROBE_TAIL, exact_keep=0.0),
                                                "keep": dict(mode="kvp", exact_tail=PROBE_TAIL, exact_keep=PROBE_KEEP)})
        recompute = exact_keep_flops(pipe.base.model, pipe.bundle, n - PROBE_TAIL, PROBE_KEEP, n - PROBE_TAIL)
        keep_fixed = max(0.0, kept["keep"] - kept["kvp"] - recompute / (base_gflops * 1e9))
    return PrefillRates(base_fixed, base_gflops, aux_fixed, aux_gflops, keep_fixed)


def _fit(flops: list[int], seconds: list[float]) -> tuple[float, float]:
    """(fixed s, GFLOP/s) through two points; a noisy pair (time not growing with FLOPs) gives fixed 0."""
    (f1, f2), (t1, t2) = flops, seconds
    slope = (t2 - t1) / (f2 - f1) if f2 > f1 else 0.0
    if slope <= 0 or t1 - slope * f1 < 0:
        return 0.0, f2 / max(t2, 1e-9) / 1e9
    return t1 - slope * f1, 1 / slope / 1e9


def cache_dir() -> Path:
    if os.environ.get("KVPRED_MLX_CACHE_DIR"):
        return Path(os.environ["KVPRED_MLX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvpred-mlx"


def _rates_key(pipe: "Pipeline") -> str:
    """Model, bundle, device, machine and backend (its BLAS and switches): the rates hold for that combination
    only."""
    base = describe_base(pipe.base)
    backend = json.dumps({name: what for name, (what, _) in pipe.backend.describe().items()}, sort_keys=True)
    parts = [base["config_hash"], json.dumps(base["fingerprint"]), bundle_id(pipe.bundle), pipe.device,
             platform.node(), platform.machine(), mx.__version__, backend]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _read_rates_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable: measure again and rewrite it
