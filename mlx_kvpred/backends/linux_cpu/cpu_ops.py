"""Fast exp-based ops for MLX on x86 CPUs: exp, logsumexp, SwiGLU, GELU (tanh approximation) and attention.

MLX's x86 CPU build evaluates `mx.exp` at ~15 ns per element (scalar code), so SiLU, softmax and attention cost as
much as all of a layer's matmuls. `fast_exp` is MLX's own polynomial for 2**f (within 3e-7 of `mx.exp`) in one
compiled kernel that the JIT's compiler vectorizes: rounding by adding 1.5 * 2**23 instead of `floor` (not
vectorizable without SSE4.1) and Estrin's scheme (shallow enough for MLX to fuse the whole chain): ~8x faster.
`prepare_model` gives one model's attention and MLP modules subclasses of their mlx-lm classes that call these
instead of `scaled_dot_product_attention` and `swiglu` (mlx-lm's modules stay as they are), and its rope modules a
prefill path in C.

Causal attention over more than one query row (prefill) runs outside MLX's one-threaded ops: in C on all cores
(`cpu_kernels.causal_attention`) where the install built it, else in numpy (`numpy_causal_attention`, whose SIMD
exp, max and sum take ~1.5 ns a score where MLX's CPU kernels take ~6; docs/performance.md). It is an
`mx.custom_function` whose gradient comes from the MLX blocks, so autodiff stays right; it evaluates its inputs, so
it cannot run inside `mx.compile` or `mx.vmap` (`set_numpy_attention(False)` or KVPRED_NUMPY_ATTENTION=0 keeps it in
MLX; KVPRED_C_KERNELS=0 takes numpy over C). SwiGLU and RoPE over many rows run in C too (`cpu_kernels`).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from . import blas, cpu_kernels
from ...attention import attention_of, backbone, kv_heads
from ...errors import KVPredError
from .. import STOCK_CLASS
from ...rope_layout import rope_key, rotation_layout
from ...switch import Switch

_LOG2E = 1.4426950408889634
# Minimax coefficients of 2**f on [-0.5, 0.5], highest power first (those of MLX's own exp).
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)
_ROUND = 12582912.0  # 1.5 * 2**23: (y + _ROUND) - _ROUND rounds y to an integer in float32 arithmetic


def _exp2_of(y: mx.array) -> mx.array:
    """2**y for y in [-126, 127], as plain arithmetic (fused into one kernel by the callers' mx.compile)."""
    n = (y + _ROUND) - _ROUND
    f = y - n
    c6, c5, c4, c3, c2, c1, c0 = _EXP2_POLY
    f2 = f * f
    p = (c0 + c1 * f) + f2 * (c2 + c3 * f) + (f2 * f2) * ((c4 + c5 * f) + f2 * c6)
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


@mx.compile
def _exp_kernel(x: mx.array) -> mx.array:
    return _exp2_of(mx.clip(x, -87.0, 88.0) * _LOG2E)


@mx.compile
def _exp_shifted_kernel(x: mx.array, m: mx.array) -> mx.array:
    return _exp2_of(mx.maximum((x - m) * _LOG2E, -87.0 * _LOG2E))  # x - m <= 0: only the lower clamp


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """exp of a float32 array (inputs clamped to [-87, 88]: no inf, no denormals)."""
    return _exp_kernel(x)


@fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


@mx.custom_function
def _exp_shifted(x: mx.array, m: mx.array) -> mx.array:
    """exp(x - m) for m >= x along the last axis (a row max, keepdims), in one kernel."""
    return _exp_shifted_kernel(x, m)


@_exp_shifted.vjp
def _exp_shifted_vjp(primals, cotangent, output):
    g = cotangent * output
    return g, -g.sum(axis=-1, keepdims=True)


def fast_logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    out = m + mx.log(fast_exp(x - m).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)


@mx.compile
def _swiglu_kernel(gate: mx.array, x: mx.array) -> mx.array:
    return gate / (1.0 + _exp2_of(mx.clip(-gate, -87.0, 88.0) * _LOG2E)) * x


# From this many elements (a prefill chunk's MLP), SwiGLU goes to the C kernel on all cores.
_C_SWIGLU_MIN_SIZE = 1 << 16


@mx.custom_function
def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `swiglu`, in one kernel (C on all cores for prefill-sized float32 inputs: it
    evaluates them, so `cpu_kernels.C_KERNELS.off()` around mx.compile of prefill-sized calls)."""
    if (gate.size >= _C_SWIGLU_MIN_SIZE and gate.shape == x.shape and gate.dtype == x.dtype == mx.float32
            and cpu_kernels.C_KERNELS.enabled()):
        return mx.array(cpu_kernels.swiglu(np.asarray(gate), np.asarray(x)))
    return _swiglu_kernel(gate, x)


@fast_swiglu.vjp
def _fast_swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    s = 1.0 / (1.0 + fast_exp(-gate))
    return cotangent * x * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


_GELU_SCALE = 0.7978845608028654  # sqrt(2 / pi)
_GELU_CUBIC = 0.044715


def _gelu_z(x: mx.array) -> mx.array:
    """gelu_approx's tanh argument: sqrt(2 / pi) (x + 0.044715 x^3)."""
    return _GELU_SCALE * (x + _GELU_CUBIC * (x * x * x))


@mx.compile
def _gelu_approx_kernel(x: mx.array) -> mx.array:
    # 0.5 x (1 + tanh(z)) = x / (1 + exp(-2 z)): MLX's tanh is scalar on x86
    return x / (1.0 + _exp2_of(mx.clip(-2.0 * _gelu_z(x), -87.0, 88.0) * _LOG2E))


@mx.custom_function
def fast_gelu_approx(x: mx.array) -> mx.array:
    """mlx.nn.gelu_approx (gemma's MLP) in one kernel, ~8x faster on an x86 CPU."""
    return _gelu_approx_kernel(x)


@fast_gelu_approx.vjp
def _fast_gelu_approx_vjp(primals, cotangent, output):
    x = primals  # one input: the array itself
    s = 1.0 / (1.0 + fast_exp(-2.0 * _gelu_z(x)))
    return (cotangent * (s + 2.0 * x * s * (1.0 - s) * _GELU_SCALE * (1.0 + 3 * _GELU_CUBIC * x * x)),)


class _FastNN(types.ModuleType):
    """mlx.nn as the fast classes' calls see it (their own globals, not mlx.nn): gelu_approx is fast_gelu_approx."""

    gelu_approx = staticmethod(fast_gelu_approx)

    def __getattr__(self, name: str):
        return getattr(nn, name)


# Below this many scores per head (short decode steps), MLX's fused kernel is cheaper than several small ops.
_SDPA_MIN_SCORES = 1024
# Query rows per block: a causal block only multiplies the keys its rows may see (measured: docs/performance.md).
_SDPA_BLOCK_ROWS = 128
# ... and at most this many scores (all heads) per block; above it in all, blocks run one at a time (peak memory).
_SDPA_BLOCK_SCORES = 1 << 24


def fast_scaled_dot_product_attention(queries: mx.array, keys: mx.array, values: mx.array, cache, scale: float,
                                      mask: Optional[mx.array | str], sinks: Optional[mx.array] = None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` (queries (B, Hq, L, D), keys/values (B, Hkv, S, D), grouped
    heads, "causal" aligned to the end of the keys, bool or additive masks) in blocks of query rows: a causal block
    stops at its last row's key, the exp is `fast_exp`'s kernel, and rows are normalized after P V (L x D, not L x S).
    Causal masks over several rows go to numpy_causal_attention (the same blocks) unless set_numpy_attention(False)."""
    if hasattr(cache, "bits"):  # quantized K/V: (packed, scales, biases) tuples
        return _mlx_lm_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    L, S = queries.shape[2], keys.shape[2]
    if sinks is not None or L * S < _SDPA_MIN_SCORES or queries.dtype != mx.float32:
        return _mlx_lm_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    B, n_q, _, D = queries.shape
    n_kv = keys.shape[1]
    causal = isinstance(mask, str)
    if causal and mask != "causal":
        raise ValueError(f"unsupported attention mask {mask!r}")
    if L == 1 and (causal or mask is None):  # decode: a kv head's query heads are the rows of one GEMM (2x faster
        # at 1000-8000 keys than the broadcast batched matmul below, which copies the keys)
        scores = (queries * scale).reshape(B, n_kv, n_q // n_kv, D) @ keys.swapaxes(-1, -2)
        e = _exp_shifted(scores, mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
        return ((e @ values) / e.sum(axis=-1, keepdims=True)).reshape(B, n_q, 1, D)
    if causal and _numpy_attention_enabled():
        return _outside_mlx_attention_fn(float(scale))(queries, keys, values)
    spans = _row_spans(mask) if _numpy_attention_enabled() else None
    if spans is not None and (cpu_kernels.C_KERNELS.enabled() or not spans[0].any()):
        # rows at scattered positions (positions.recompute_at): one C call, or numpy per causal run (no windows)
        n = int(spans[1][-1])
        return _outside_mlx_rows_attention_fn(float(scale))(queries, keys[:, :, :n], values[:, :, :n],
                                                            *(mx.array(a) for a in spans))
    return _blocked_attention(queries, keys, values, scale, mask)


def _row_spans(mask) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, ends), int32 (L,) each, where row i of a bool (L, S) mask sees exactly keys starts[i]..ends[i] - 1,
    at least one, and neither ever falls (rows at their own positions, in order, in a sliding window or not:
    recompute_at); None for any other mask."""
    if not isinstance(mask, mx.array) or mask.ndim != 2 or mask.dtype != mx.bool_:
        return None
    m = np.asarray(mask)
    ends = m.shape[1] - np.argmax(m[:, ::-1], axis=1).astype(np.int32)
    starts = np.argmax(m, axis=1).astype(np.int32)
    keys = np.arange(m.shape[1])[None]
    if (not m.any(axis=1).all() or (np.diff(starts) < 0).any() or (np.diff(ends) < 0).any()
            or not (m == ((keys >= starts[:, None]) & (keys < ends[:, None]))).all()):
        return None
    return starts, ends


def _causal_runs(ends: np.ndarray) -> list[tuple[int, int, int]]:
    """Rows that see keys 0..ends[i] - 1, where ends grow by one a row, as runs (start, stop, keys of the last):
    each a causal block over its first keys."""
    bounds = [0, *(np.flatnonzero(np.diff(ends) != 1) + 1).tolist(), len(ends)]
    return [(a, b, int(ends[b - 1])) for a, b in zip(bounds[:-1], bounds[1:])]


def _blocked_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                       mask: Optional[mx.array | str]) -> mx.array:
    """fast_scaled_dot_product_attention's MLX blocks (L > 1, or a mask decode doesn't take)."""
    B, n_q, L, D = queries.shape
    n_kv, S = keys.shape[1], keys.shape[2]
    causal = isinstance(mask, str)
    q = (queries * scale).reshape(B, n_kv, n_q // n_kv, L, D)
    keys_t = keys[:, :, None].swapaxes(-1, -2)
    # [V | 1]: P V's last column is the row sum of P, so no pass of its own over the scores
    values1 = mx.concatenate([values, mx.ones(values.shape[:-1] + (1,), values.dtype)], axis=-1)[:, :, None]
    if not causal and mask is not None and mask.ndim == 4:  # (B|1, Hq|1, L, S) -> (B|1, n_kv|1, group|1, L, S)
        heads = mask.shape[1]
        mask = mask.reshape(mask.shape[0], n_kv, heads // n_kv, L, S) if heads > 1 else mask[:, :, None]
    rows = max(1, min(_SDPA_BLOCK_ROWS, _SDPA_BLOCK_SCORES // (B * n_q * S)))
    serial = B * n_q * L * S > _SDPA_BLOCK_SCORES
    outs = []
    for r in range(0, L, rows):
        end = min(r + rows, L)
        if outs and serial:
            mx.eval(outs[-1])  # one block's scores alive at a time (a lazy graph builds them all at once)
        qb = q[..., r:end, :]
        if causal:  # keys before `diag` are seen by every row of the block: only the rows x rows diagonal is masked
            diag, seen = S - L + r, S - L + end
            parts = [qb @ keys_t[..., diag:seen] + _causal_mask(end - r)]
            spans = [(diag, seen)]
            if diag > 0:
                parts.append(qb @ keys_t[..., :diag])
                spans.append((0, diag))
        else:
            scores = qb @ keys_t
            if mask is not None:
                m = mask[..., r:end, :] if mask.shape[-2] == L else mask
                scores = mx.where(m, scores, mx.finfo(scores.dtype).min) if m.dtype == mx.bool_ else scores + m
            parts, spans = [scores], [(0, S)]
        row_max = parts[0].max(axis=-1, keepdims=True)
        for p in parts[1:]:
            row_max = mx.maximum(row_max, p.max(axis=-1, keepdims=True))
        row_max = mx.stop_gradient(row_max)
        pv = None
        for p, (lo, hi) in zip(parts, spans):
            term = _exp_shifted(p, row_max) @ values1[..., lo:hi, :]
            pv = term if pv is None else pv + term
        outs.append(pv[..., :D] / pv[..., D:])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    return out.reshape(B, n_q, L, D)


NUMPY_ATTENTION_ENV = "KVPRED_NUMPY_ATTENTION"  # "0": causal prefill attention in MLX ops, not C or numpy
# On where mlx_kvpred.blas loaded a BLAS whose sgemm it can call (Linux).
NUMPY_ATTENTION = Switch(NUMPY_ATTENTION_ENV, blas.has_sgemm, "outside MLX", "MLX ops",
                         "no BLAS loaded by mlx_kvpred.blas to run its products")
_numpy_attention_enabled = NUMPY_ATTENTION.enabled
set_numpy_attention = NUMPY_ATTENTION.set  # True, False or None (the default); returns the previous state
# Attention in MLX ops inside the block: what training uses (autodiff records its graph, no recomputation).
mlx_attention = NUMPY_ATTENTION.off


@contextmanager
def mlx_ops() -> Iterator[None]:
    """Every op in MLX inside the block (no C kernels, no numpy): what training uses."""
    with NUMPY_ATTENTION.off(), cpu_kernels.C_KERNELS.off():
        yield


def prefill_attention_note() -> str:
    """Where causal prefill attention runs (doctor's "C kernels" row says why not in C)."""
    if not _numpy_attention_enabled():
        return NUMPY_ATTENTION.note()
    if cpu_kernels.C_KERNELS.enabled():
        return f"C kernel on {cpu_kernels.threads()} threads, products by the loaded BLAS"
    return "numpy, products by the loaded BLAS"


_OUTSIDE_MLX_BLOCK_ROWS = 128  # query rows per block, C and numpy (64-256 within noise at 1024 tokens)
_numpy_masks: dict[int, np.ndarray] = {}


def numpy_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Causal attention, "causal" aligned to the end of the keys: q (B, Hq, L, D), k and v (B, Hkv, S, D), grouped
    heads. Per kv head, blocks of query rows (all its query heads at once) against the keys they may see; only the
    rows x rows diagonal is masked. The products go to blas.sgemm (MLX's BLAS and its threads)."""
    B, n_q, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    group = n_q // n_kv
    out = np.empty((B, n_q, L, D), np.float32)
    for b in range(B):
        for h in range(n_kv):
            keys, values, heads = k[b, h], v[b, h], slice(h * group, (h + 1) * group)
            if keys.strides[-1] != 4 or values.strides[-1] != 4:  # blas.sgemm reads rows as they are laid out
                keys, values = np.ascontiguousarray(keys), np.ascontiguousarray(values)
            for start in range(0, L, _OUTSIDE_MLX_BLOCK_ROWS):
                end = min(start + _OUTSIDE_MLX_BLOCK_ROWS, L)
                rows, seen = end - start, S - L + end
                rows_q = (q[b, heads, start:end] * np.float32(scale)).reshape(group * rows, D)
                scores = blas.sgemm(rows_q, keys[:seen], transpose_b=True)
                scores.reshape(group, rows, seen)[:, :, seen - rows:] += _numpy_diagonal_mask(rows)
                scores -= scores.max(axis=1, keepdims=True)
                np.exp(scores, out=scores)
                pv = blas.sgemm(scores, values[:seen])
                pv /= scores.sum(axis=1, keepdims=True)
                out[b, heads, start:end] = pv.reshape(group, rows, D)
    return out


def _numpy_diagonal_mask(rows: int) -> np.ndarray:
    """_causal_mask as a numpy array (kept per size)."""
    mask = _numpy_masks.get(rows)
    if mask is None:
        mask = _numpy_masks[rows] = np.array(_causal_mask(rows))
    return mask


@lru_cache(maxsize=None)
def _outside_mlx_attention_fn(scale: float):
    """The C kernel's or numpy_causal_attention on MLX arrays (one per attention scale), differentiable through the
    MLX blocks."""

    @mx.custom_function
    def attention(queries: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        arrays = [np.asarray(a) for a in (queries, keys, values)]  # evaluates them
        if cpu_kernels.C_KERNELS.enabled():
            return mx.array(cpu_kernels.causal_attention(*arrays, scale, rows=_OUTSIDE_MLX_BLOCK_ROWS))
        return mx.array(numpy_causal_attention(*arrays, scale))

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        _, grads = mx.vjp(lambda q, k, v: _blocked_attention(q, k, v, scale, "causal"), list(primals), [cotangent])
        return tuple(grads)

    return attention


@lru_cache(maxsize=None)
def _outside_mlx_rows_attention_fn(scale: float):
    """_outside_mlx_attention_fn's for rows that see keys starts[i]..ends[i] - 1 (int32 (L,) arrays, _row_spans):
    the C kernel in one call, or numpy_causal_attention per causal run (starts all 0)."""

    @mx.custom_function
    def attention(queries: mx.array, keys: mx.array, values: mx.array, starts: mx.array,
                  ends: mx.array) -> mx.array:
        q, k, v, first, end = (np.asarray(a) for a in (queries, keys, values, starts, ends))  # evaluates them
        if cpu_kernels.C_KERNELS.enabled():
            return mx.array(cpu_kernels.causal_attention(q, k, v, scale, rows=_OUTSIDE_MLX_BLOCK_ROWS,
                                                         spans=(first, end)))
        return mx.array(np.concatenate([numpy_causal_attention(q[:, :, a:b], k[:, :, :seen], v[:, :, :seen], scale)
                                        for a, b, seen in _causal_runs(end)], axis=2))

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        queries, keys, values, starts, ends = primals
        at = mx.arange(keys.shape[2])[None]
        mask = (at >= starts[:, None]) & (at < ends[:, None])
        _, grads = mx.vjp(lambda q, k, v: _blocked_attention(q, k, v, scale, mask), [queries, keys, values],
                          [cotangent])
        return (*grads, mx.zeros_like(starts), mx.zeros_like(ends))

    return attention


_causal_masks: dict[int, mx.array] = {}


def _causal_mask(rows: int) -> mx.array:
    """Additive (rows, rows) mask of a causal block's diagonal: 0 on and below it, -1e30 above (kept per size)."""
    mask = _causal_masks.get(rows)
    if mask is None:
        i = mx.arange(rows)
        mask = _causal_masks[rows] = mx.where(i[:, None] >= i[None], 0.0, -1e30).astype(mx.float32)
    return mask


def _mlx_lm_sdpa(*args, **kwargs):
    from mlx_lm.models.base import scaled_dot_product_attention

    return scaled_dot_product_attention(*args, **kwargs)


_PATCHES = {"swiglu": fast_swiglu, "scaled_dot_product_attention": fast_scaled_dot_product_attention,
            "nn": _FastNN("mlx.nn")}  # "nn": only for calls that read nn.gelu_approx

# From this many floats of q or k (a prefill chunk), RoPE goes to the C kernel with tables made once per chunk.
_C_ROPE_MIN_SIZE = 1 << 15
_NUMPY_COPY_ROWS = 64  # append_kv_in_c copies this many cached positions or fewer with numpy
_c_rope_classes: dict[type, type] = {}
_rope_tables: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _c_rope_call(self, x: mx.array, offset=0, **kwargs) -> mx.array:
    """The rope module's call; prefill-sized float32 (1, H, L, D) inputs at an int offset run the C kernel."""
    if (not kwargs and isinstance(offset, int) and x.ndim == 4 and x.shape[0] == 1 and x.size >= _C_ROPE_MIN_SIZE
            and x.dtype == mx.float32 and cpu_kernels.C_KERNELS.enabled()):
        cos, sin, partner = _prefill_rope_tables(self, x.shape[-1], offset, x.shape[2])
        return mx.array(cpu_kernels.rope(np.asarray(x), cos, sin, partner))
    return getattr(type(self), STOCK_CLASS).__call__(self, x, offset=offset, **kwargs)


def _prefill_rope_tables(rope: nn.Module, head_dim: int, offset: int, L: int):
    """cos and sin (L, head_dim) at positions offset.. and the pair partners, read back from the module itself on
    a unit input; kept for the chunk's other layers."""
    key = (repr(rope_key(rope)), head_dim, offset, L)  # repr: the key holds lists and sets
    made = _rope_tables.get(key)
    if made is None:
        unit, partner, cos_at, sin_at, sign = rotation_layout(rope, head_dim)
        r = getattr(type(rope), STOCK_CLASS).__call__(rope, mx.repeat(unit[None, None, None], L, axis=2), offset=offset)[0, 0]
        if len(_rope_tables) >= 8:
            _rope_tables.clear()
        made = _rope_tables[key] = (np.array(r[:, cos_at]), np.array(r[:, sin_at] * sign),
                                    np.array(partner.astype(mx.int32)))
    return made


def append_kv_in_c(layers: Sequence[nn.Module], caches: Sequence[Any], keys: Sequence[mx.array],
                   values: Sequence[mx.array]) -> list[bool]:
    """Append pre-RoPE keys and values (1, L, n_kv * D) to mlx-lm KVCaches that must grow for them anyway, or hold
    fewer positions than L (kvp's exact head): new cache buffers (made and evaluated together for all layers), the
    old positions copied, and keys RoPE'd (the layer's rope module, from its tables) by the C kernel and values
    copied, instead of MLX's RoPE, transposes and slice updates (~3x faster). Returns, per layer, whether it was
    appended; the caller appends the others with MLX."""
    plans = [_c_append_plan(layer, cache, k.shape[1], k.shape[2]) if _c_appendable(k, v) else None
             for layer, cache, k, v in zip(layers, caches, keys, values)]
    also = [a for k, v, plan in zip(keys, values, plans) if plan for a in (k, v)]
    grown = grown_cache_buffers(caches, plans, also=also)
    done = [False] * len(plans)
    for i, (buffers, views) in grown.items():
        n_kv, D, _, rope = plans[i]
        L, offset = keys[i].shape[1], caches[i].offset
        tables = _prefill_rope_tables(rope, D, offset, L)
        for src, out, rotation in zip((keys[i], values[i]), views, (tables, None)):
            rows = np.array(src, copy=False).reshape(1, L, n_kv, D).transpose(0, 2, 1, 3)
            cpu_kernels.write_rows(rows, out[:, :, offset:offset + L], rotation)
        take_cache_buffers(caches[i], buffers, L)
        done[i] = True
    return done


def _c_appendable(keys: mx.array, values: mx.array) -> bool:
    """Whether append_kv_in_c takes these keys and values: float32 (1, L, width), enough of them for C to pay."""
    return (keys.dtype == mx.float32 and values.dtype == mx.float32 and keys.ndim == 3 and keys.shape[0] == 1
            and keys.shape == values.shape and keys.size >= _C_ROPE_MIN_SIZE)


def _c_append_plan(layer: nn.Module, cache, L: int, width: int, room: int = 0) -> tuple | None:
    """(n_kv, head_dim, the new buffers' positions, the rope module) where `cache` of `layer` can take L positions of
    keys and values `width` wide in new buffers written in C, with `room` more positions after them."""
    attn = attention_of(layer)
    rope = attn.get("rope") if isinstance(attn, nn.Module) else None
    n_kv, _ = kv_heads(layer)
    if (not cpu_kernels.C_KERNELS.enabled() or type(cache) is not KVCache or "k_norm" in attn
            or not hasattr(rope, STOCK_CLASS) or width % n_kv):
        return None
    D, offset = width // n_kv, cache.offset
    if cache.keys is not None and ((offset + L <= cache.keys.shape[2] and offset > L) or cache.keys.shape[3] != D):
        return None  # room in the buffer for many more positions than held: MLX's slice update writes in place
    return n_kv, D, -(-(offset + L + room) // cache.step) * cache.step, rope


def grown_cache_buffers(caches: Sequence[Any], plans: Sequence[tuple | None], *, also: Sequence[mx.array] = ()
                        ) -> dict[int, tuple[list[mx.array], list[np.ndarray]]]:
    """For each cache with a plan: new key and value buffers of the plan's positions (made and evaluated together,
    with `also` and the caches' own buffers) and writable numpy views of them, the cached positions copied in.
    Caches whose buffers numpy cannot write in place are left out."""
    buffers = {i: [mx.zeros((1, plan[0], plan[2], plan[1]), mx.float32) for _ in range(2)]
               for i, plan in enumerate(plans) if plan is not None}
    if not buffers:
        return {}
    old = [(caches[i].keys, caches[i].values) for i in buffers if caches[i].offset]  # copied in below
    mx.eval(list(buffers.values()), list(also), old)
    grown = {}
    for i, pair in buffers.items():
        views = [np.array(b, copy=False) for b in pair]  # fresh buffers, referenced only here: written in place
        if not all(v.flags.c_contiguous and v.flags.writeable for v in views):
            continue
        cache, offset = caches[i], caches[i].offset
        for out, old in zip(views, (cache.keys, cache.values) if offset else ()):
            old = np.array(old, copy=False)[:, :, :offset]  # the positions already cached
            if offset <= _NUMPY_COPY_ROWS:  # (kvp's exact head) a threaded C call would cost more than the copy
                out[:, :, :offset] = old
            else:
                cpu_kernels.write_rows(old if old.strides[3] == 4 else np.ascontiguousarray(old), out[:, :, :offset],
                                       None)
        grown[i] = pair, views
    return grown


def take_cache_buffers(cache: KVCache, buffers: list[mx.array], L: int) -> None:
    """`cache` holds its new buffers, written L positions past its offset."""
    cache.keys, cache.values = buffers
    cache.offset += L


def attention_scores_in_c(layers: Sequence[nn.Module], queries: Sequence[mx.array], keys: Sequence[mx.array], *,
                          end: int, pool: int, windows: Sequence[int | None] | None = None) -> mx.array | None:
    """importance.attention_scores (its arguments, `exp` aside) in one C call (cpu_kernels.tail_importance): the
    products, softmax, smoothing and maxima over ~3.5M scores of a 1024-token prompt in ~12 ms where MLX's ops take
    ~35. None where not done: the C kernels off, or arrays not float32 (1, heads, positions, head_dim) with each
    position's head_dim floats contiguous."""
    if not cpu_kernels.C_KERNELS.enabled():
        return None
    try:
        qs = [np.ascontiguousarray(np.array(q[0], copy=False)) for q in queries]
        ks = [np.array(k[0], copy=False) for k in keys]
        scales = [attention_of(layer).scale for layer in layers]
        out = cpu_kernels.tail_importance(qs, ks, scales, [w or 0 for w in (windows or [None] * len(layers))],
                                          end=end, pool=pool)
    except (ValueError, TypeError):
        return None
    return mx.array(out)


PREDICT_ROWS_MAX = 256  # predict_kv_in_c's positions at most: each thread's transposed inputs stay in L2


def predict_kv_in_c(predictor: nn.Module, norm: nn.Module, stream: mx.array, prev: mx.array | None,
                    layers: Sequence[nn.Module], caches: Sequence[Any], *, room: int = 0) -> bool:
    """The predicted K/V of the R positions of `stream` (1, R, dim: the aux's residual streams before its final
    RMSNorm `norm`) appended to `caches`, those of the base `layers` whose transforms `predictor` learned (its
    linear_layers, in order), in one C call (cpu_kernels.predict_kv_rows): the norm, the previous position's
    projection (`prev` (1, 1, dim) the normed stream before the first position, None: zeros), the stacked product,
    and each head's rows written into new cache buffers (append_kv_in_c's), keys RoPE'd. That replaces predict_fused's
    GEMM and split and write_predicted_kv's pass. The buffers have `room` for that many positions more (kvp's exact
    tail, appended next, then grows no buffer). False (nothing done) where it cannot run: a predictor that does not
    stack (KVPredictor.stacks_hidden), float32 weights and streams only, at most PREDICT_ROWS_MAX positions, caches
    that append_kv_in_c would not take."""
    R, dim = stream.shape[1], norm.weight.shape[0]
    if (not cpu_kernels.C_KERNELS.enabled() or not predictor.stacks_hidden() or type(norm) is not nn.RMSNorm
            or stream.dtype != mx.float32 or stream.shape != (1, R, dim) or not 0 < R <= PREDICT_ROWS_MAX
            or len(layers) != len(predictor.linear_layers) or len(caches) != len(layers)):
        return False
    cfg = predictor.config
    weight, bias, _ = predictor.stacked_transforms()
    proj = predictor.prev_token_proj.weight if cfg.prev_token_dim else None
    arrays = [norm.weight, proj, weight, bias]  # kv_predictor's order
    if any(a is not None and a.dtype != mx.float32 for a in arrays) or weight.shape[1] != dim + cfg.prev_token_dim:
        return False
    plans = [_c_append_plan(layer, cache, R, cfg.base_kv_dims[i], room)
             for layer, cache, i in zip(layers, caches, predictor.linear_layers)]
    if any(plan is None for plan in plans) or len({plan[:2] for plan in plans}) != 1:
        return False
    grown = grown_cache_buffers(caches, plans, also=[stream] + ([] if prev is None else [prev]))
    if len(grown) != len(plans):
        return False
    n_kv, D = plans[0][:2]
    # alive until the call returns; C reads them as dense rows (a weight set from a transposed array is a strided view)
    kept = [None if a is None else np.ascontiguousarray(np.array(a, copy=False)) for a in arrays]
    c_predictor = cpu_kernels.StackedPredictor(dim, cfg.prev_token_dim, D, n_kv, 2 * len(plans), norm.eps,
                                               *(None if a is None else a.ctypes.data for a in kept))
    targets = (cpu_kernels.KVTarget * (2 * len(plans)))()
    for i, (plan, cache) in enumerate(zip(plans, caches)):
        tables = _prefill_rope_tables(plan[3], D, cache.offset, R)
        kept.append(tables)
        for part, (view, rotation) in enumerate(zip(grown[i][1], (tables, (None, None, None)))):
            at = view.ctypes.data + cache.offset * D * 4  # head 0's first new position
            targets[2 * i + part] = cpu_kernels.KVTarget(at, view.shape[2] * D,
                                                         *(None if t is None else t.ctypes.data for t in rotation))
    rows = np.ascontiguousarray(np.array(stream[0], copy=False))
    before = None if prev is None else np.ascontiguousarray(np.array(prev, copy=False).reshape(dim))
    cpu_kernels.predict_kv_rows(c_predictor, rows, before, targets)
    for i, cache in enumerate(caches):
        take_cache_buffers(cache, grown[i][0], R)
    return True


def _c_rope_class(cls: type) -> type:
    """`cls` with its call over prefill-sized inputs in C (one class per rope class)."""
    made = _c_rope_classes.get(cls)
    if made is None:
        made = _c_rope_classes[cls] = type(cls.__name__, (cls,), {"__call__": _c_rope_call, STOCK_CLASS: cls,
                                                                   "__module__": cls.__module__})
    return made


def _rope_modules(model: nn.Module) -> list[nn.Module]:
    """The attention's rope modules of `model` that rotate entry pairs (none for unknown architectures)."""
    try:
        layers = backbone(model).layers
        found = [attention_of(layer).get("rope") for layer in layers]
    except (KVPredError, AttributeError):
        return []
    return [r for r in found if isinstance(r, nn.Module) and hasattr(r, "dims") and hasattr(r, "traditional")]


_fast_classes: dict[type, type | None] = {}


def _fast_ops_class(cls: type) -> type | None:
    """`cls` (an mlx-lm attention or MLP class) whose call is mlx-lm's own code reading the fast ops where it reads
    `scaled_dot_product_attention`, `swiglu` or `nn.gelu_approx` from its module; None where its call reads none.
    mlx-lm's module is left as it is: only instances given this class (prepare_model) run the fast ops."""
    if cls not in _fast_classes:
        call = cls.__call__
        code = getattr(call, "__code__", None)
        names = set(code.co_names) & set(_PATCHES) if code is not None else set()
        names = {n for n in names if n in call.__globals__ and (n != "nn" or "gelu_approx" in code.co_names)}
        if not names:
            _fast_classes[cls] = None
        else:
            namespace = {**call.__globals__, **{n: _PATCHES[n] for n in names}}
            fast_call = types.FunctionType(code, namespace, call.__name__, call.__defaults__, call.__closure__)
            fast_call.__kwdefaults__, fast_call.__doc__ = call.__kwdefaults__, call.__doc__
            _fast_classes[cls] = type(cls.__name__, (cls,), {"__call__": fast_call, STOCK_CLASS: cls,
                                                             "__module__": cls.__module__})
    return _fast_classes[cls]


def prepare_model(model: nn.Module) -> None:
    """`model`'s attention and MLP modules call the fast ops (fast_scaled_dot_product_attention, fast_swiglu,
    fast_gelu_approx) and its rope modules run prefill-sized inputs in C: each module gets a subclass of its mlx-lm
    class (idempotent). Nothing module-wide changes, so other models of the architecture (one an app loads itself)
    run mlx-lm's own code."""
    ropes = {id(r) for r in _rope_modules(model)}
    for _, module in model.named_modules():
        stock = getattr(type(module), STOCK_CLASS, type(module))
        fast = _c_rope_class(stock) if id(module) in ropes else _fast_ops_class(stock)
        if fast is not None:
            module.__class__ = fast


def restore_model(model: nn.Module) -> None:
    """`model`'s modules back to their mlx-lm classes."""
    for _, module in model.named_modules():
        stock = getattr(type(module), STOCK_CLASS, None)
        if stock is not None:
            module.__class__ = stock


@contextmanager
def stock_mlx_ops(model: nn.Module) -> Iterator[None]:
    """Run `model` with mlx-lm's own classes and no C kernels inside the block (e.g. to time stock mlx-lm)."""
    classes = [(module, type(module)) for _, module in model.named_modules()]
    restore_model(model)
    try:
        with cpu_kernels.C_KERNELS.off():  # nor C kernels in other models (an aux's rope modules)
            yield
    finally:
        for module, cls in classes:
            module.__class__ = cls
