"""Where prefill time goes, per op kind: a llama-family forward run op by op, each evaluated and timed.

Kinds: gemm (the q/k/v/o and MLP projections), attention scores (Q K^T), softmax (mask, max, exp, sum, divide),
attention values (P V), norm, rope, swiglu, residual (adds), copies (head transposes and the cache update),
embedding. Evaluating after every op costs a little scheduling and loses what MLX fuses or overlaps; the same
run also times the model as the runtime calls it (one graph per chunk), so the table shows both.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mlx_kvpred.attention import attention_of, backbone
from mlx_kvpred.cpu_ops import fast_softmax, fast_swiglu
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.flops import linear_params

KINDS = ("gemm", "attention scores", "softmax", "attention values", "norm", "rope", "swiglu", "residual", "copies",
         "embedding")


def _check_llama(model: nn.Module) -> None:
    layer = backbone(model).layers[0]
    attn = attention_of(layer)
    if not all(name in attn for name in ("q_proj", "k_proj", "v_proj", "o_proj")) or "gate_proj" not in layer.mlp:
        raise KVPredError(f"profile: {type(model).__module__} is not a llama-family model (q/k/v/o, gate/up/down)")


def _attention_parts(timed: Callable, q: mx.array, k: mx.array, v: mx.array, scale: float, offset: int) -> mx.array:
    """Causal grouped attention in the three timed parts cpu_ops.fast_scaled_dot_product_attention runs."""
    B, n_q, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    qg = (q * scale).reshape(B, n_kv, n_q // n_kv, L, D)
    scores = timed("attention scores", lambda: qg @ k[:, :, None].swapaxes(-1, -2))
    mask = mx.arange(L)[:, None] + offset >= mx.arange(S)[None]
    probs = timed("softmax", lambda: fast_softmax(mx.where(mask, scores, mx.finfo(scores.dtype).min), axis=-1))
    out = timed("attention values", lambda: probs @ v[:, :, None])
    return out.reshape(B, n_q, L, D)


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
            o = _attention_parts(timed, q, k, v, attn.scale, offset)
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
    return {"kinds": {k: times.get(k, 0.0) for k in KINDS}, "sum": sum(times.values()), "model": whole}


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
    return 2.0 * n_tokens * sum(linear_params(layer) for layer in backbone(model).layers)
