"""Fast exp-based ops for MLX on x86 CPUs: exp, softmax, logsumexp, SwiGLU and attention.

MLX's x86 CPU build evaluates `mx.exp` at ~24 ns per element (scalar code; its polynomial uses `fma`, which
without FMA codegen is likely a libm call), so SiLU, softmax and attention cost as much as all of a layer's matmuls. `fast_exp` is the same polynomial
(the same results to 1 ulp) written in plain mul/add in one compiled kernel: ~7x faster.
`use_fast_cpu_ops` points an mlx-lm model module's `swiglu` and `scaled_dot_product_attention` at these.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
# Minimax coefficients of 2**f on [-0.5, 0.5], highest power first (those of MLX's own exp).
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)


@mx.compile
def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """exp(x) = p * 2**n: the polynomial p and the float32 bit pattern of 2**n."""
    y = mx.clip(x, -87.0, 88.0) * _LOG2E
    n = mx.floor(y + 0.5)
    f = y - n
    p = mx.full(f.shape, _EXP2_POLY[0], dtype=mx.float32)
    for c in _EXP2_POLY[1:]:
        p = p * f + c
    return p, (n.astype(mx.int32) + 127) << 23


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """exp of a float32 array (inputs clamped to [-87, 88]: no inf, no denormals)."""
    p, bits = _exp_parts(x)
    return p * mx.view(bits, mx.float32)


@fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


def fast_softmax(x: mx.array, axis: int = -1) -> mx.array:
    e = fast_exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


def fast_logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    out = m + mx.log(fast_exp(x - m).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)


def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `swiglu`."""
    return gate / (1.0 + fast_exp(-gate)) * x


# Below this many scores per head (decode steps), MLX's fused kernel is cheaper than several small ops.
_SDPA_MIN_SCORES = 4096
# Query rows are taken in blocks of at most this many scores (all heads), to bound the memory of long prompts.
_SDPA_BLOCK_SCORES = 1 << 24


def fast_scaled_dot_product_attention(queries: mx.array, keys: mx.array, values: mx.array, cache, scale: float,
                                      mask: Optional[mx.array | str], sinks: Optional[mx.array] = None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` (queries (B, Hq, L, D), keys/values (B, Hkv, S, D), grouped
    heads, "causal" aligned to the end of the keys, bool or additive masks) with `fast_softmax`."""
    L, S = queries.shape[2], keys.shape[2]
    if sinks is not None or hasattr(cache, "bits") or L * S < _SDPA_MIN_SCORES or queries.dtype != mx.float32:
        return _mlx_lm_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    B, n_q, _, D = queries.shape
    n_kv = keys.shape[1]
    q = (queries * scale).reshape(B, n_kv, n_q // n_kv, L, D)
    keys_t, values = keys[:, :, None].swapaxes(-1, -2), values[:, :, None]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        mask = mx.arange(L)[:, None] + (S - L) >= mx.arange(S)[None]
    if mask is not None and mask.ndim == 4:  # (B|1, Hq|1, L, S) -> grouped (B|1, n_kv|1, group|1, L, S)
        heads = mask.shape[1]
        mask = mask.reshape(mask.shape[0], n_kv, heads // n_kv, L, S) if heads > 1 else mask[:, :, None]
    rows = max(1, _SDPA_BLOCK_SCORES // (B * n_q * S))
    outs = []
    for r in range(0, L, rows):
        scores = q[..., r:r + rows, :] @ keys_t  # (B, n_kv, group, rows, S)
        if mask is not None:
            m = mask[..., r:r + rows, :] if mask.shape[-2] == L else mask
            scores = mx.where(m, scores, mx.finfo(scores.dtype).min) if m.dtype == mx.bool_ else scores + m
        outs.append(fast_softmax(scores, axis=-1) @ values)
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    return out.reshape(B, n_q, L, D)


def _mlx_lm_sdpa(*args, **kwargs):
    from mlx_lm.models.base import scaled_dot_product_attention

    return scaled_dot_product_attention(*args, **kwargs)


_PATCHES = {"swiglu": fast_swiglu, "scaled_dot_product_attention": fast_scaled_dot_product_attention}


def use_fast_cpu_ops(model: nn.Module, enabled: bool = True) -> list[str]:
    """Make the mlx-lm module that defines `model`'s class call the fast ops (or the originals again).
    This affects every model of that architecture in the process. Returns the names it set."""
    module = sys.modules[type(model).__module__]
    originals = module.__dict__.setdefault("_kvpred_originals", {})
    done = []
    for name, fast in _PATCHES.items():
        if name not in module.__dict__:
            continue
        if name not in originals:  # the first call sees mlx-lm's own function
            originals[name] = module.__dict__[name]
        setattr(module, name, fast if enabled else originals[name])
        done.append(name)
    return done


@contextmanager
def stock_mlx_ops(model: nn.Module) -> Iterator[None]:
    """Run `model`'s architecture with mlx-lm's own functions inside the block (e.g. to time stock mlx-lm)."""
    module = sys.modules[type(model).__module__]
    current = {name: module.__dict__[name] for name in _PATCHES if name in module.__dict__}
    use_fast_cpu_ops(model, enabled=False)
    try:
        yield
    finally:
        for name, fn in current.items():
            setattr(module, name, fn)
