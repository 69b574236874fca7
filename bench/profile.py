"""Where prefill time goes, per op kind: a llama-family forward run op by op, each evaluated and timed.

Kinds: gemm (the q/k/v/o and MLP projections), attention (cpu_ops' blocked attention: Q K^T, mask, softmax, P V),
norm, rope, swiglu, residual (adds), copies (head transposes and the cache update), embedding. Evaluating after
every op costs a little scheduling and loses what MLX fuses or overlaps; the same run also times the model as the
runtime calls it (one graph per chunk), so the table shows both.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mlx_kvpred.attention import attention_of, backbone
from mlx_kvpred.backends.linux_cpu.cpu_ops import fast_scaled_dot_product_attention, fast_swiglu
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.flops import layers_flops, measure_gemm_gflops

KINDS = ("gemm", "attention", "norm", "rope", "swiglu", "residual", "copies", "embedding")


def _check_llama(model: nn.Module) -> None:
    layer = backbone(model).layers[0]
    attn = attention_of(layer)
    if not all(name in attn for name in ("q_proj", "k_proj", "v_proj", "o_proj")) or "gate_proj" not in layer.mlp:
        raise KVPredError(f"profile: {type(model).__module__} is not a llama-family model (q/k/v/o, gate/up/down)")


def profile_models(pipe, *, lengths: list[int], step: int = 2048, seed: int = 0,
                   progress: Callable[[], None] | None = None) -> dict:
    """profile_prefill of the base (and the aux, with a bundle) at each length on random tokens, and the GEMM rate
    measured before and after."""
    import numpy as np

    models = [("base", pipe.base.model)] + ([("aux", pipe.bundle.aux)] if pipe.bundle else [])
    rng = np.random.default_rng(seed)
    before = measure_gemm_gflops()
    rows = []
    for n in lengths:
        tokens = mx.array(rng.integers(0, pipe.base.config["vocab_size"], n).astype(np.int32))
        for name, model in models:
            time_model_prefill(model, tokens[:64], step=64)  # warm up the kernels
            p = profile_prefill(model, tokens, step=step)
            rows.append({"model": name, "prompt_tokens": n, "step": step, **p, "gemm_flops": gemm_flops(model, n)})
            if progress:
                progress()
    rate = (before + measure_gemm_gflops()) / 2 * 1e9
    for r in rows:
        r["gemm_fraction"] = r["gemm_flops"] / r["as_run"] / rate
    return {"gemm_gflops": rate / 1e9, "rows": rows}


def print_profile(result: dict) -> None:
    print(f"prefill per op kind, ms (each op evaluated alone); fp32 GEMM {result['gemm_gflops']:.0f} GFLOP/s")
    print(f"{'model':>5} {'prompt':>6} " + " ".join(f"{k[:10]:>10}" for k in KINDS)
          + f" {'sum':>7} {'as run':>7} {'of GEMM':>8}")
    for r in result["rows"]:
        print(f"{r['model']:>5} {r['prompt_tokens']:>6} " + " ".join(f"{r['kinds'][k] * 1e3:>10.0f}" for k in KINDS)
              + f" {r['sum'] * 1e3:>7.0f} {r['as_run'] * 1e3:>7.0f} {r['gemm_fraction']:>8.2f}")
    print("of GEMM: projection FLOPs / the model's own prefill time (as run) / the GEMM rate")


def profile_prefill(model: nn.Module, tokens: mx.array, *, step: int) -> dict:
    """Seconds per op kind to prefill `tokens` in chunks of `step`, and the model's own time for the same chunks."""
    _check_llama(model)
    inner = backbone(model)
    times: dict[str, float] = defaultdict(float)

    def timed(kind: str, fn: Callable[[], mx.array]) -> mx.array:
        tic = time.perf_counter()
        out = fn()
        mx.eval(out)
        times[kind] += time.perf_counter() - tic
        return out

    cache = make_prompt_cache(model)
    for start in range(0, tokens.size, step):
        ids = tokens[None, start:start + step]
        x = timed("embedding", lambda: inner.embed_tokens(ids))
        for layer, c in zip(inner.layers, cache):
            attn = attention_of(layer)
            B, L, _ = x.shape
            h = timed("norm", lambda: layer.input_layernorm(x))
            q, k, v = timed("gemm", lambda: [attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)])
            q, k, v = timed("copies", lambda: [mx.contiguous(t.reshape(B, L, n, -1).transpose(0, 2, 1, 3))
                                               for t, n in ((q, attn.n_heads), (k, attn.n_kv_heads),
                                                            (v, attn.n_kv_heads))])
            offset = c.offset
            q, k = timed("rope", lambda: [attn.rope(q, offset=offset), attn.rope(k, offset=offset)])
            k, v = timed("copies", lambda: list(c.update_and_fetch(k, v)))
            o = timed("attention", lambda: fast_scaled_dot_product_attention(q, k, v, c, attn.scale, "causal"))
            o = timed("copies", lambda: mx.contiguous(o.transpose(0, 2, 1, 3).reshape(B, L, -1)))
            o = timed("gemm", lambda: attn.o_proj(o))
            x = timed("residual", lambda: x + o)
            h = timed("norm", lambda: layer.post_attention_layernorm(x))
            g, u = timed("gemm", lambda: [layer.mlp.gate_proj(h), layer.mlp.up_proj(h)])
            a = timed("swiglu", lambda: fast_swiglu(g, u))
            d = timed("gemm", lambda: layer.mlp.down_proj(a))
            x = timed("residual", lambda: x + d)
        timed("norm", lambda: inner.norm(x))
    whole = time_model_prefill(model, tokens, step=step)
    return {"kinds": {k: times.get(k, 0.0) for k in KINDS}, "sum": sum(times.values()), "as_run": whole}


def time_model_prefill(model: nn.Module, tokens: mx.array, *, step: int) -> float:
    """The model's prefill of `tokens` in chunks of `step` as the runtime runs it: backbone only, cache evaluated."""
    inner = backbone(model)
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    for start in range(0, tokens.size, step):
        inner(tokens[None, start:start + step], cache=cache)
        mx.eval([c.state for c in cache])
    return time.perf_counter() - tic


def gemm_flops(model: nn.Module, n_tokens: int) -> float:
    """FLOPs of the projections alone (no attention, no LM head) over `n_tokens`."""
    return layers_flops(backbone(model).layers, n_tokens, 0)
