"""TTFT / TPOT / memory benchmark of modes base, kvp, aux and mlx-lm's own generate_step, interleaved.

The mlx-lm mode is stock mlx-lm: its generate_step with MLX's own attention and SwiGLU kernels, not `cpu_ops`, and
one-row matmuls as sgemm (the gemv_forward shim off). base-sgemm and kvp-sgemm are base and kvp with the shim off,
base-eager and kvp-eager with the model's own decode step instead of the compiled one (decode.py), base-mlx-attn
and kvp-mlx-attn with causal prefill attention in MLX ops instead of C (cpu_ops), base-no-c and kvp-no-c with the C
kernels off (numpy attention, MLX SwiGLU and RoPE; cpu_kernels), to time each side by side."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from contextlib import ExitStack, contextmanager
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, generation_stream

from mlx_kvpred.backends.linux_cpu import blas
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bundle import Bundle, new_bundle
from mlx_kvpred.backends.linux_cpu.cpu_kernels import C_KERNELS
from mlx_kvpred.backends.linux_cpu.cpu_ops import mlx_attention, stock_mlx_ops
from mlx_kvpred.backends.linux_cpu.decode import C_DECODE, C_ROWS, COMPILED_DECODE, QUANTIZED_DECODE
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.flops import measure_gemm_gflops, ttft_flops
from mlx_kvpred.pipeline import Pipeline, choose_mode, generate_tokens, prefill_rates
from mlx_kvpred.predictor import layer_pruned_map

# auto: the policy's pick; llama.cpp: the same GGUF; -sgemm: one-row matmuls as OpenBLAS sgemm, not sgemv (the
# gemv_forward shim off); -eager: decode with the model's own code, not the compiled step; -mlx-decode: the
# compiled MLX step, not the C one; -fp32-decode: the C step on float32 weights, not the GGUF's quantized ones;
# -mlx-attn: causal prefill attention in MLX ops, not C or numpy; -no-c: the prefill C kernels off (numpy
# attention, MLX SwiGLU and RoPE); -mlx-rows: a short prompt's last rows, kvp's exact tail and short aux pass in
# MLX, not C
SGEMM_SUFFIX, EAGER_SUFFIX, MLX_ATTN_SUFFIX, NO_C_SUFFIX = "-sgemm", "-eager", "-mlx-attn", "-no-c"
MLX_DECODE_SUFFIX, FP32_DECODE_SUFFIX, MLX_ROWS_SUFFIX = "-mlx-decode", "-fp32-decode", "-mlx-rows"
SUFFIXES = (SGEMM_SUFFIX, EAGER_SUFFIX, MLX_DECODE_SUFFIX, FP32_DECODE_SUFFIX, MLX_ATTN_SUFFIX, NO_C_SUFFIX,
            MLX_ROWS_SUFFIX)
MODES = ("base", "kvp", "aux", "mlx-lm", "auto", "llama.cpp", "specprefill") + tuple(
    f"{m}{suffix}" for suffix in SUFFIXES for m in ("base", "kvp"))
# kvp@F: kvp with exact_keep F; specprefill@F: specprefill with keep F (several in one run, for a Pareto)
FRACTION_MODE = re.compile(r"^(kvp|specprefill)@(0(\.\d+)?|1(\.0+)?)$")


def pipeline_mode(mode: str) -> str:
    """The pipeline mode a bench mode runs ("kvp-sgemm" -> "kvp", "specprefill@0.1" -> "specprefill")."""
    mode = mode.split("@")[0]
    for suffix in SUFFIXES:
        mode = mode.removesuffix(suffix)
    return mode


def mode_options(mode: str) -> dict:
    """generate_tokens' options a bench mode sets: kvp@F exact_keep=F, specprefill@F keep=F."""
    match = FRACTION_MODE.match(mode)
    if not match:
        return {}
    return {"exact_keep" if match.group(1) == "kvp" else "keep": float(match.group(2))}


@contextmanager
def sgemm_only():
    """One-row matmuls as sgemm inside the block (the gemv_forward shim's forwarding off; stock mlx-lm has none).
    The switch is read when an op runs, so work still queued on MLX's streams is finished at both ends: the default
    one and generate_step's own (a decode step still running there when the block ended was counted as forwarded)."""
    _finish_queued_work()
    was = blas.set_gemv_forward(False)
    try:
        yield
    finally:
        _finish_queued_work()
        if was:
            blas.set_gemv_forward(True)


def _finish_queued_work() -> None:
    mx.synchronize()
    mx.synchronize(generation_stream)


def untrained_lp_bundle(pipe: Pipeline, n_layers: int) -> Bundle:
    """An in-memory KVP-LP bundle of the base's first `n_layers` layers with an untrained predictor: it costs
    what a trained one of that shape costs, so it times a depth before anyone trains it."""
    n = len(pipe.base.model.layers)
    if not 1 <= n_layers <= n:
        raise KVPredError(f"--aux-layers-keep must be in 1..{n}, got {n_layers}")
    kept = list(range(n_layers))
    aux, _ = make_layer_pruned_aux(pipe.base.model, pipe.base.config, kept)
    return new_bundle(pipe.base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, n), aux_layers=kept)


def token_stream(pipe: Pipeline, mode: str, prompt: mx.array, gen_tokens: int, exact_tail: int = 1):
    if mode == "mlx-lm":
        return generate_step(prompt, pipe.base.model, max_tokens=gen_tokens)
    return generate_tokens(pipe, prompt, mode=pipeline_mode(mode), max_tokens=gen_tokens, exact_tail=exact_tail,
                           **mode_options(mode))


_LLAMA_CPP: dict[str, object] = {}


def llama_cpp_model(pipe: Pipeline, n_ctx: int):
    """llama-cpp-python's Llama on the base's GGUF file (the optional engine to compare with), loaded once."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise KVPredError("--modes llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    if not pipe.base.source.endswith(".gguf"):
        raise KVPredError("--modes llama.cpp needs a .gguf base model (--model FILE.gguf)")
    key = f"{pipe.base.source}:{n_ctx}"
    if key not in _LLAMA_CPP:
        _LLAMA_CPP.clear()
        _LLAMA_CPP[key] = Llama(model_path=pipe.base.source, n_ctx=n_ctx, n_threads=os.cpu_count(),
                                n_batch=512, verbose=False)
    return _LLAMA_CPP[key]


def time_llama_cpp(pipe: Pipeline, prompt: mx.array, gen_tokens: int, n_ctx: int) -> dict:
    """llama.cpp on the same tokens, greedy: TTFT to its first sampled token, TPOT of the rest (no prefix reuse)."""
    llm = llama_cpp_model(pipe, n_ctx)
    llm.reset()  # generate() would otherwise reuse the KV of a shared prefix from the previous run
    tic = time.perf_counter()
    ttft, stamps = None, []
    for i, _ in enumerate(llm.generate(prompt.tolist(), top_k=1, temp=0.0, reset=True)):
        now = time.perf_counter()
        ttft = now - tic if ttft is None else ttft
        stamps.append(now)
        if i + 1 == gen_tokens:
            break
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "peak_memory_gb": float("nan")}


def time_one(pipe: Pipeline, mode: str, prompt: mx.array, gen_tokens: int, exact_tail: int = 1,
             n_ctx: int = 4096) -> dict:
    """TTFT: call to first token (evaluated); TPOT: mean time of the following tokens."""
    if mode == "llama.cpp":
        return time_llama_cpp(pipe, prompt, gen_tokens, n_ctx)
    mx.clear_cache()
    mx.reset_peak_memory()
    with ExitStack() as stack:
        if mode == "mlx-lm":
            stack.enter_context(stock_mlx_ops(pipe.base.model))
        if mode == "mlx-lm" or mode.endswith(SGEMM_SUFFIX):
            stack.enter_context(sgemm_only())
        if mode.endswith(EAGER_SUFFIX):
            stack.enter_context(COMPILED_DECODE.off())
        if mode.endswith(MLX_DECODE_SUFFIX):
            stack.enter_context(C_DECODE.off())
        if mode.endswith(FP32_DECODE_SUFFIX):
            stack.enter_context(QUANTIZED_DECODE.off())
        if mode.endswith(MLX_ATTN_SUFFIX):
            stack.enter_context(mlx_attention())
        if mode.endswith(NO_C_SUFFIX):
            stack.enter_context(C_KERNELS.off())
        if mode.endswith(MLX_ROWS_SUFFIX):
            stack.enter_context(C_ROWS.off())
        tic = time.perf_counter()
        ttft, stamps = None, []
        for token, _ in token_stream(pipe, mode, prompt, gen_tokens, exact_tail):
            now = time.perf_counter()
            if ttft is None:
                ttft = now - tic
            stamps.append(now)
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "peak_memory_gb": mx.get_peak_memory() / 1e9}


def measure_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s): median rate at which numpy's own BLAS streams an `mb` MB fp32 matrix through
    sgemv (all cores), the fastest read of weights here; independent of MLX and of the gemv_forward shim. (An MLX
    elementwise copy measures MLX's kernel more than the memory: 9.8 GB/s against 31.6 on 2026-12-04.)"""
    weights = np.random.default_rng(0).standard_normal((mb * (1 << 20) // 16384, 4096), dtype=np.float32)
    x = np.ones(4096, np.float32)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        weights @ x
        times.append(time.perf_counter() - tic)
    return weights.nbytes / statistics.median(times) / 1e9


def machine_limits() -> dict:
    """The fp32 GEMM rate (as `doctor` measures it) and the memory bandwidth, measured now."""
    return {"gemm_gflops": measure_gemm_gflops(), "bandwidth_gbs": measure_bandwidth_gbs()}


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads (every parameter once: the LM head or tied embedding too)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def environment(pipe: Pipeline) -> dict:
    import mlx_lm

    import mlx_kvpred
    from mlx_kvpred.backends.linux_cpu import blas

    st = blas.load_fast_blas()
    core, core_fix = blas.core_check()
    dtypes = sorted({str(v.dtype) for _, v in tree_flatten(pipe.base.model.parameters())})
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "kvpred_mlx": mlx_kvpred.__version__,
            "blas": st.path or st.source, "blas_core": core, "blas_core_fix": core_fix, "gemv_forward": st.gemv_forward,
            "device": pipe.device, "dtypes": dtypes,
            "threads": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "model": pipe.base.source,
            "bundle": str(pipe.bundle.path) if pipe.bundle and pipe.bundle.path else None,
            "bundle_trained": bool(pipe.bundle and pipe.bundle.config.trained)}


def run_bench(pipe: Pipeline, *, lengths: list[int], modes: list[str], repeats: int = 3, warmup: int = 1,
              gen_tokens: int = 16, prompt_tokens: np.ndarray | None = None, seed: int = 0, exact_tail: int = 1,
              progress: Callable[[], None] | None = None) -> dict:
    """Per prompt length, every mode run `warmup + repeats` times, interleaved (base, kvp, ..., base, ...)."""
    bad = [m for m in modes if m not in MODES and not FRACTION_MODE.match(m)]
    if bad:
        raise KVPredError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}, kvp@F (exact keep F) or "
                          "specprefill@F (keep F)")
    if any(pipeline_mode(m) in ("kvp", "aux") for m in modes) and pipe.bundle is None:
        raise KVPredError("--modes kvp/aux need a KVP bundle (--kvp DIR or --aux-layers-keep N)")
    if any(m.endswith(SGEMM_SUFFIX) for m in modes) and not blas.load_fast_blas().gemv_forward:
        raise KVPredError("--modes *-sgemm compare against the gemv_forward shim, which is not loaded here "
                          "(kvpred-mlx doctor says why)")
    if "auto" in modes and pipe.bundle is not None:
        prefill_rates(pipe)  # the one-time probe, before anything is timed
    limit = pipe.context_length
    rng = np.random.default_rng(seed)
    before = machine_limits()
    rows = []
    for n in lengths:
        if n < 2 or (limit and n + gen_tokens > limit):
            raise KVPredError(f"--prompt-lengths: {n} does not fit (2 .. {limit} - gen tokens)")
        if prompt_tokens is not None:
            if len(prompt_tokens) < n:
                raise KVPredError(f"--prompt-file has {len(prompt_tokens)} tokens, {n} asked for")
            prompt = mx.array(prompt_tokens[:n])
        else:
            prompt = mx.array(rng.integers(0, pipe.base.config["vocab_size"], n).astype(np.int32))
        runs = {m: [] for m in modes}
        for r in range(warmup + repeats):
            for m in modes:
                result = time_one(pipe, m, prompt, gen_tokens, exact_tail, n_ctx=max(lengths) + gen_tokens + 8)
                if r >= warmup:
                    runs[m].append(result)
                if progress:
                    progress()
        picked = {m: choose_mode(pipe, m, new_tokens=n, exact_tail=exact_tail, exact_keep=pipe.exact_keep).mode
                  if m == "auto"
                  else pipeline_mode(m) for m in {"base", *modes}}
        flops = {m: ttft_flops(picked[m], pipe.base, pipe.bundle, n, exact_tail=exact_tail,
                               **{"keep": pipe.keep, "exact_keep": pipe.exact_keep, **mode_options(m)})
                 for m in picked}
        for m in modes:
            ttfts = [x["ttft"] for x in runs[m]]
            tpot = statistics.median(x["tpot"] for x in runs[m])
            rows.append({"mode": m, "prompt_tokens": n, "ttft_median": statistics.median(ttfts),
                         "ttft_min": min(ttfts), "ttft_max": max(ttfts), "tpot_median": tpot,
                         "prompt_tps": n / statistics.median(ttfts), "decode_tps": 1 / tpot if tpot else None,
                         "peak_memory_gb": max(x["peak_memory_gb"] for x in runs[m]),
                         "ttft_flops": flops[m], "ttft_all": ttfts, "runs_as": picked[m]})
    add_speedups(rows)
    after = machine_limits()
    limits = {k: (before[k] + after[k]) / 2 for k in before} | {"before": before, "after": after}
    add_limit_fractions(rows, limits, weight_bytes(pipe.base.model))
    return {"environment": environment(pipe), "limits": limits, "settings": {"repeats": repeats, "warmup": warmup,
            "gen_tokens": gen_tokens, "exact_tail": exact_tail,
            "prompt": "file" if prompt_tokens is not None else "random tokens"},
            "rows": rows}


def add_speedups(rows: list[dict]) -> None:
    """Next to each row: measured and analytical TTFT speedup over base at the same length."""
    base = {r["prompt_tokens"]: r for r in rows if r["mode"] == "base"}
    for r in rows:
        b = base.get(r["prompt_tokens"])
        r["speedup_measured"] = b["ttft_median"] / r["ttft_median"] if b else None
        r["speedup_analytical"] = b["ttft_flops"] / r["ttft_flops"] if b else None
        r["tpot_vs_base"] = r["tpot_median"] / b["tpot_median"] if b else None
        others = [o["ttft_median"] for o in rows if o["prompt_tokens"] == r["prompt_tokens"]
                  and o["mode"] in ("base", "kvp")]
        r["ttft_vs_best"] = r["ttft_median"] / min(others) if r["mode"] == "auto" and others else None


def add_limit_fractions(rows: list[dict], limits: dict, base_weight_bytes: int) -> None:
    """Each row's prefill rate as a fraction of the GEMM rate (its TTFT FLOPs / TTFT), and its TPOT against the
    bandwidth limit of reading the base's weights once a token."""
    tpot_limit = base_weight_bytes / (limits["bandwidth_gbs"] * 1e9)
    for r in rows:
        r["gemm_fraction"] = r["ttft_flops"] / r["ttft_median"] / (limits["gemm_gflops"] * 1e9)
        r["tpot_limit"] = tpot_limit
        r["tpot_vs_limit"] = r["tpot_median"] / tpot_limit if r["runs_as"] != "aux" else None


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in dict.fromkeys(r["mode"] for r in rows):
        pts = [(r["prompt_tokens"], r["ttft_median"]) for r in rows if r["mode"] == m]
        a.plot(*zip(*pts), marker="o", label=m)
    a.set(xlabel="prompt tokens", ylabel="TTFT (s, median)", title="time to first token", xscale="log", yscale="log")
    a.legend()
    kvp = [r for r in rows if r["mode"] == "kvp"]
    if kvp:
        x = [r["prompt_tokens"] for r in kvp]
        b.plot(x, [r["speedup_measured"] for r in kvp], marker="o", label="measured")
        b.plot(x, [r["speedup_analytical"] for r in kvp], marker="s", ls="--", label="analytical (FLOPs)")
        b.set(xlabel="prompt tokens", ylabel="kvp TTFT speedup over base", xscale="log", title="kvp speedup")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(result: dict, *, title: str) -> None:
    """One row per mode and prompt length: medians, FLOPs, measured and analytical speedups over base."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("mode", "prompt", "TTFT ms (min-max)", "TPOT ms", "prompt tok/s", "peak GB", "TTFT GFLOP",
                "of GEMM", "speedup meas.", "speedup anal.", "meas/anal", "TPOT/base", "TPOT/limit", "auto/best"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        ratio = r["speedup_measured"] / r["speedup_analytical"] if r["speedup_analytical"] else None
        mode = r["mode"] if r.get("runs_as", r["mode"]) == r["mode"] else f"{r['mode']} ({r['runs_as']})"
        t.add_row(mode, str(r["prompt_tokens"]),
                  f"{r['ttft_median'] * 1e3:.0f} ({r['ttft_min'] * 1e3:.0f}-{r['ttft_max'] * 1e3:.0f})",
                  f"{r['tpot_median'] * 1e3:.1f}", f"{r['prompt_tps']:.0f}", f"{r['peak_memory_gb']:.2f}",
                  f"{r['ttft_flops'] / 1e9:.1f}", f"{r['gemm_fraction']:.2f}", _x(r["speedup_measured"]),
                  _x(r["speedup_analytical"]), f"{ratio:.2f}" if ratio else "",
                  f"{r['tpot_vs_base']:.3f}" if r["tpot_vs_base"] else "",
                  f"{r['tpot_vs_limit']:.2f}" if r.get("tpot_vs_limit") else "",
                  f"{r['ttft_vs_best']:.2f}" if r.get("ttft_vs_best") else "")
    Console(width=max(Console().width, 170)).print(t)
    lim = result.get("limits")
    if lim:
        print(f"limits measured before/after: fp32 GEMM {lim['before']['gemm_gflops']:.0f}/"
              f"{lim['after']['gemm_gflops']:.0f} GFLOP/s, bandwidth {lim['before']['bandwidth_gbs']:.1f}/"
              f"{lim['after']['bandwidth_gbs']:.1f} GB/s; TPOT limit (base weights / bandwidth) "
              f"{result['rows'][0]['tpot_limit'] * 1e3:.0f} ms")


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value else ""
