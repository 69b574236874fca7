"""The kernels in C (cpu_kernels.c and decode_step.c, built at install on Linux), on numpy arrays and on all cores:
prefill's causal attention, SwiGLU and RoPE, and a whole decode step. Loaded through ctypes beside the BLAS that
mlx_kvpred.blas loaded; `available()` says whether they are, `C_KERNELS` whether cpu_ops uses them
(KVPRED_C_KERNELS=0: numpy attention, MLX's SwiGLU and RoPE); decode.C_DECODE says whether decoding does."""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

from . import blas
from ...switch import Switch

_P = ctypes.c_void_p
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class Weight(ctypes.Structure):
    """decode_step.c's weight: a float32 matrix (out, in) row-major at `w`, or (w None) MLX's affine quantized
    form: `bits`-bit values packed in uint32s, float16 scales and biases per group of 32."""
    _fields_ = [("w", _P), ("packed", _P), ("scales", _P), ("biases", _P), ("bits", ctypes.c_int)]


class StepLayer(ctypes.Structure):
    """decode_step.c's step_layer: one block's norms, projections, biases and q/k norms (None: none), the cache's
    keys and values (n_kv, capacity, head_dim, rows of head_dim floats) and the floats between their heads and
    between their positions."""
    _fields_ = ([("input_norm", _P), ("post_norm", _P)] + [(name, Weight) for name in PROJECTIONS]
                + [(f"{name}_bias", _P) for name in PROJECTIONS]
                + [(name, _P) for name in ("q_norm", "k_norm", "keys", "values")]
                + [(name, ctypes.c_long) for name in ("k_head", "k_row", "v_head", "v_row")])


class StepModel(ctypes.Structure):
    """decode_step.c's step_model: the shapes, the norms' eps, the final norm, the LM head (vocab, dim), the blocks."""
    _fields_ = ([(name, ctypes.c_int) for name in ("n_layers", "dim", "n_q", "n_kv", "head_dim", "hidden", "vocab")]
                + [("eps", ctypes.c_float), ("qk_eps", ctypes.c_float), ("final_norm", _P), ("head", Weight),
                   ("layers", ctypes.POINTER(StepLayer))])


class StackedPredictor(ctypes.Structure):
    """decode_step.c's kv_predictor: the stacked transforms of a "hidden"-input predictor (n_parts * n_kv * head_dim,
    dim + prev_dim) with their bias, the aux's final norm and the previous row's projection (None: prev_dim 0)."""
    _fields_ = ([(name, ctypes.c_int) for name in ("dim", "prev_dim", "head_dim", "n_kv", "n_parts")]
                + [("eps", ctypes.c_float)] + [(name, _P) for name in ("norm", "prev_proj", "weight", "bias")])


class ImportanceLayer(ctypes.Structure):
    """decode_step.c's importance_layer: a layer's queries (n_q, w, head_dim), its keys (head g's position s at
    keys + g k_head + s k_row floats), the attention's scale and window (0: none)."""
    _fields_ = [("q", _P), ("keys", _P), ("k_head", ctypes.c_long), ("k_row", ctypes.c_long),
                ("scale", ctypes.c_float), ("window", ctypes.c_long)]


class KVTarget(ctypes.Structure):
    """decode_step.c's kv_target: where new keys or values go (head h's row r at out + h * head_stride + r *
    head_dim) and, for predict_kv_rows' keys, their RoPE tables (None for values and for decode_rows)."""
    _fields_ = [("out", _P), ("head_stride", ctypes.c_long), ("cos", _P), ("sin", _P), ("partner", _P)]


_lib: ctypes.CDLL | None = None
_note = ""


def library_path() -> str | None:
    """The built kernels next to this file, if the install compiled them."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_cpu_kernels*.so")))
    return found[0] if found else None


def _load() -> ctypes.CDLL | None:
    global _lib, _note
    if _lib is not None or _note:
        return _lib
    st = blas.load_fast_blas()
    path = library_path()
    if st.path is None:
        _note = "no BLAS loaded by mlx_kvpred.blas"
    elif path is None:
        _note = "not built (install a C compiler, e.g. apt-get install gcc, then reinstall kvpred-mlx)"
    else:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            _note = f"{path} did not load: {e}"
        else:
            if lib.kernels_init(st.path.encode(), st.prefix.encode()) != 0:
                _note = f"{st.path} has no {st.prefix}cblas_sgemm"
            else:
                f, i, l, p = ctypes.c_float, ctypes.c_int, ctypes.c_long, ctypes.c_void_p
                lib.causal_attention.argtypes = [p, l, l, p, l, l, p, l, l, p, i, i, i, i, i, i, f, i, p, p]
                lib.causal_attention.restype = i
                lib.swiglu.argtypes = [p, p, p, l]
                lib.rope.argtypes = [p, l, l, p, p, p, p, l, l, i, i, i]
                lib.swiglu.restype = lib.rope.restype = None
                model, targets = ctypes.POINTER(StepModel), ctypes.POINTER(KVTarget)
                lib.decode_step.argtypes = [model, p, i, p, p, p, targets, l, p]
                lib.decode_rows.argtypes = [model, p, i, i, p, p, p, p, targets, l, p, p, p]
                lib.predict_kv_rows.argtypes = [ctypes.POINTER(StackedPredictor), p, p, i, targets]
                lib.decode_step.restype = lib.decode_rows.restype = lib.decode_quantized_supported.restype = i
                lib.predict_kv_rows.restype = i
                lib.weight_times_row.argtypes, lib.weight_times_row.restype = [ctypes.POINTER(Weight), i, l, p, p], i
                lib.decode_isa.argtypes, lib.decode_isa.restype = [i], i
                lib.tail_importance.argtypes = [ctypes.POINTER(ImportanceLayer), i, i, i, i, i, l, l, i, p]
                lib.tail_importance.restype = i
                _lib = lib
    return _lib


def available() -> bool:
    """The kernels are built and loaded."""
    return _load() is not None


def note() -> str:
    """Why the kernels are not available ("" when they are)."""
    _load()
    return _note


C_KERNELS = Switch("KVPRED_C_KERNELS", available, "on: causal prefill attention, SwiGLU and RoPE",
                   "off: numpy prefill attention, MLX SwiGLU and RoPE", note)


def threads() -> int:
    """Threads the kernels run on (the BLAS's thread count)."""
    return int(_load().kernels_threads()) if available() else 1


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the C kernels are not available: {_note}")
    return lib


def _rows_contiguous(a: np.ndarray) -> np.ndarray:
    """`a` (B, H, N, D) as float32 with contiguous rows and its batches after its heads (as the kernel reads it)."""
    if a.dtype != np.float32 or a.strides[3] != 4 or a.strides[0] != a.shape[1] * a.strides[1]:
        return np.ascontiguousarray(a, np.float32)
    return a


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, *, rows: int = 128,
                     spans: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Causal attention ("causal" aligned to the end of the keys): q (B, Hq, L, D), k and v (B, Hkv, S, D), grouped
    heads, float32; blocks of `rows` query rows per task, tasks shared by `threads()` threads. `spans` (starts,
    ends), each (L,) and nondecreasing: row i sees keys starts[i]..ends[i] - 1 instead (rows at scattered positions,
    in sliding windows)."""
    lib = _require()
    B, n_q, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    if spans is not None:
        starts, ends = (np.ascontiguousarray(a, np.int32) for a in spans)
        if (starts.shape != (L,) or ends.shape != (L,) or starts.min() < 0 or ends.max() > S
                or (ends <= starts).any() or (np.diff(starts) < 0).any() or (np.diff(ends) < 0).any()):
            raise ValueError(f"causal_attention: spans must be {L} nonempty key spans within 0..{S}, in order")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or n_q % n_kv or (spans is None and S < L):
        raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape}")
    q, k, v = (_rows_contiguous(a) for a in (q, k, v))
    out = np.empty((B, n_q, L, D), np.float32)
    strides = [s // 4 for a in (q, k, v) for s in a.strides[1:3]]
    status = lib.causal_attention(q.ctypes.data, *strides[0:2], k.ctypes.data, *strides[2:4], v.ctypes.data,
                                  *strides[4:6], out.ctypes.data, B, n_q, n_kv, L, S, D, scale, rows,
                                  *((None, None) if spans is None else (starts.ctypes.data, ends.ctypes.data)))
    if status != 0:
        raise MemoryError(f"causal_attention: no thread got its {rows} x {S} scratch scores")
    return out


def swiglu(gate: np.ndarray, x: np.ndarray) -> np.ndarray:
    """silu(gate) * x of two float32 arrays of one shape (cpu_ops.fast_swiglu's arithmetic), on all cores."""
    lib = _require()
    if gate.shape != x.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and x {x.shape} differ")
    gate, x = (np.ascontiguousarray(a, np.float32) for a in (gate, x))
    out = np.empty(gate.shape, np.float32)
    lib.swiglu(gate.ctypes.data, x.ctypes.data, out.ctypes.data, out.size)
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """x (1, H, L, D) rotated by tables: out[..., l, i] = x[..., l, i] cos[l, i] + x[..., l, partner[i]] sin[l, i]
    (cos and sin (L, D) float32, partner (D,) int32: rope_layout's rotation), on all cores."""
    lib = _require()
    _, H, L, D = x.shape
    if x.shape[0] != 1 or cos.shape != (L, D) or sin.shape != (L, D) or partner.shape != (D,):
        raise ValueError(f"rope: x {x.shape}, tables {cos.shape} {sin.shape}, partner {partner.shape}")
    if x.dtype != np.float32 or x.strides[3] != 4:
        x = np.ascontiguousarray(x, np.float32)
    cos, sin = (np.ascontiguousarray(t, np.float32) for t in (cos, sin))
    partner = np.ascontiguousarray(partner, np.int32)
    out = np.empty(x.shape, np.float32)
    lib.rope(x.ctypes.data, x.strides[1] // 4, x.strides[2] // 4, cos.ctypes.data, sin.ctypes.data,
             partner.ctypes.data, out.ctypes.data, L * D, D, H, L, D)
    return out


def write_rows(x: np.ndarray, out: np.ndarray, tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
    """x (1, H, L, D) written into out (1, H, L, D, e.g. a slice of a cache buffer) in place, RoPE'd by tables
    (cos, sin, partner as rope takes them) or copied (None); both float32 with rows of D floats contiguous."""
    lib = _require()
    _, H, L, D = x.shape
    if out.shape != x.shape or x.dtype != np.float32 or out.dtype != np.float32 or x.strides[3] != 4 \
            or out.strides[3] != 4 or not out.flags.writeable:
        raise ValueError(f"write_rows: x {x.shape} {x.dtype} {x.strides}, out {out.shape} {out.dtype} {out.strides}")
    cos, sin, partner = (np.ascontiguousarray(t) for t in tables) if tables is not None else (None, None, None)
    if tables is not None and (cos.shape != (L, D) or sin.shape != (L, D) or partner.shape != (D,)):
        raise ValueError(f"write_rows: tables {cos.shape} {sin.shape} {partner.shape} for x {x.shape}")
    addr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    lib.rope(x.ctypes.data, x.strides[1] // 4, x.strides[2] // 4, addr(cos), addr(sin), addr(partner),
             out.ctypes.data, out.strides[1] // 4, out.strides[2] // 4, H, L, D)


def decode_step(model: StepModel, x: np.ndarray, past: int, cos: np.ndarray, sin: np.ndarray, partner: np.ndarray,
                kv_out: ctypes.Array, kv_at: int, logits: np.ndarray) -> None:
    """One token's decode step (decode_step.c) on all cores: x (dim,) its embedding, `past` cached positions, RoPE
    tables cos and sin ((n_q + n_kv) head_dim, the attention's scale folded into q's) and partner (int32) at
    position `past`. Writes the new keys and values at row kv_at of `kv_out` (as decode_rows) and the logits
    (vocab,); all float32 and contiguous, which the caller guarantees (decode.CDecoder)."""
    _check_step(_require().decode_step(ctypes.byref(model), x.ctypes.data, past, cos.ctypes.data, sin.ctypes.data,
                                       partner.ctypes.data, kv_out, kv_at, logits.ctypes.data))


def decode_rows(model: StepModel, x: np.ndarray, past: int, cos: np.ndarray, sin: np.ndarray, partner: np.ndarray,
                kv_out: ctypes.Array, kv_at: int, logits: np.ndarray | None,
                stream_out: np.ndarray | None = None, *, positions: np.ndarray | None = None,
                queries_out: np.ndarray | None = None) -> None:
    """decode_step over R positions past .. past + R - 1 at once: x (R, dim) their residual streams entering the
    model's first layer, cos and sin (R, (n_q + n_kv) head_dim); writes the new keys and values into `kv_out` (2
    n_layers KVTargets: each layer's keys, then its values; buffers kept alive by the caller) from row kv_at on,
    the last row's logits (vocab,) unless `logits` is None, the residual streams leaving the model's last layer
    (R, dim) into `stream_out` and each layer's rotated queries (n_layers, R, n_q head_dim; the tables' scale in
    them) into `queries_out` if given. Products of several rows read each weight once for all of them.
    `positions` (R >= 2 sorted int32, each < past): the rows are at those positions of caches holding all `past`
    (kv_out pointing at the layers' own buffers); their K/V replace what is there and each attends to positions up
    to its own."""
    _check_step(_require().decode_rows(ctypes.byref(model), x.ctypes.data, x.shape[0], past,
                                       None if positions is None else positions.ctypes.data, cos.ctypes.data,
                                       sin.ctypes.data, partner.ctypes.data, kv_out, kv_at,
                                       None if logits is None else logits.ctypes.data,
                                       None if stream_out is None else stream_out.ctypes.data,
                                       None if queries_out is None else queries_out.ctypes.data))


def predict_kv_rows(predictor: StackedPredictor, stream: np.ndarray, prev: np.ndarray | None,
                    targets: ctypes.Array) -> None:
    """Predicted keys and values of R positions (decode_step.c's predict_kv_rows) into `targets` (one KVTarget per
    part, the caller's buffers and tables kept alive by the caller): `stream` (R, dim) the aux's residual streams
    before its final norm, `prev` (dim,) the normed stream of the position before (None: zeros); float32 and
    contiguous, which the caller guarantees (cpu_ops.predict_kv_in_c)."""
    _check_step(_require().predict_kv_rows(ctypes.byref(predictor), stream.ctypes.data,
                                           None if prev is None else prev.ctypes.data, stream.shape[0], targets))


def weight_times_row(weight: Weight, x: np.ndarray, out: np.ndarray) -> None:
    """out (n,) = W x on all cores (decode_step.c's weight_times_row): `weight` (n, K) float32 or quantized, x (K,)
    float32 and contiguous, K a multiple of 32; the caller keeps the weight's arrays alive (decode.QuantizedHead)."""
    _check_step(_require().weight_times_row(ctypes.byref(weight), x.shape[0], out.shape[0], x.ctypes.data,
                                            out.ctypes.data))


def tail_importance(queries: list[np.ndarray], keys: list[np.ndarray], scales: list[float], windows: list[int],
                    *, end: int, pool: int) -> np.ndarray:
    """importance.attention_scores in one C call on all cores (decode_step.c's tail_importance): queries[i] (n_q, w,
    head_dim) layer i's rotated queries of the last w positions, keys[i] (n_kv, S, head_dim) its keys (any strides
    between heads and positions, head_dim floats contiguous), float32; windows[i] 0 for none. Returns (end,)."""
    n_q, w, D = queries[0].shape
    n_kv, S = keys[0].shape[:2]
    layers = (ImportanceLayer * len(queries))()
    for layer, q, k, scale, window in zip(layers, queries, keys, scales, windows):
        if q.shape != (n_q, w, D) or k.shape != (n_kv, S, D) or not q.flags.c_contiguous or k.strides[2] != 4 \
                or q.dtype != np.float32 or k.dtype != np.float32:
            raise ValueError(f"tail_importance: queries {q.shape} {q.dtype}, keys {k.shape} {k.strides} {k.dtype}")
        layer.q, layer.keys, layer.scale, layer.window = q.ctypes.data, k.ctypes.data, scale, window
        layer.k_head, layer.k_row = k.strides[0] // 4, k.strides[1] // 4
    out = np.empty(end, np.float32)
    _check_step(_require().tail_importance(layers, len(queries), n_q, n_kv, D, w, S, end, pool, out.ctypes.data))
    return out


def _check_step(status: int) -> None:
    if status == 2:
        raise ValueError("decode_step: quantized weights on a CPU without AVX2 or AVX-512 (see quantized_decode())")
    if status != 0:
        raise MemoryError("decode_step: no scratch memory for the step")


def quantized_decode() -> bool:
    """decode_step reads quantized weights on this CPU (AVX-512, or AVX2 with FMA; and F16C)."""
    return available() and bool(_load().decode_quantized_supported())


DECODE_ISAS = ("portable", "avx2", "avx512")


def decode_isa(wanted: str | None = None) -> str:
    """The instruction set decode_step uses (one of DECODE_ISAS); `wanted` sets it, at most what the CPU has
    (lower ones for side-by-side timing and tests). Not while a step runs."""
    return DECODE_ISAS[_require().decode_isa(-1 if wanted is None else DECODE_ISAS.index(wanted))]
