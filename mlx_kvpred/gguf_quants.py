"""GGML tensor types -> float32, in numpy, computed as ggml's dequantize_row_* functions compute them (fp32
arithmetic in the same order), for the types MLX's GGUF reader cannot unpack (K-quants, Q5_0/Q5_1, BF16)."""

from __future__ import annotations

import numpy as np

# GGML type id -> (name, weights per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2),
}
MLX_NATIVE = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # what mx.load reads (and keeps packed) itself
QK_K = 256


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of each block, as (n_blocks, 1) float32."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32): low nibbles, then high nibbles (the Q4_0/Q4_1/Q5 layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q4_0(b: np.ndarray) -> np.ndarray:
    return (_nibbles(b[:, 2:18]).astype(np.int8) - 8).astype(np.float32) * _f16(b, 0)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _nibbles(b[:, 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bit j of it, as 0 or 16."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")
    return bits.astype(np.uint8) << 4


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6])
    return (q.astype(np.int8) - 16).astype(np.float32) * _f16(b, 0)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8])
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:34].copy().view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block (ggml's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    low = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return low.astype(np.float32), mins.astype(np.float32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)  # 4 groups of 32 bytes: 64 weights each (low nibbles, then high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * m)[:, :, None]).reshape(-1, QK_K)


def _q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # bit 2j / 2j+1 of byte l: the fifth bit of weight l of sub-block 2j / 2j+1
    qs = b[:, 48:176].reshape(-1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    q = (low | high).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * m)[:, :, None]).reshape(-1, QK_K)


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32)  # 16 scales, one per 16 weights
    d = _f16(b, 208)
    low = np.concatenate([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4],
                         axis=2)  # (n, 2 halves, 128)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2) << 4
    q = ((low | high).astype(np.int8) - 32).astype(np.float32).reshape(-1, 16, 16)
    return ((d * scales)[:, :, None] * q).reshape(-1, QK_K)


_DEQUANTIZE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
               "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a tensor of GGML type `kind` stored in `raw` (uint8 bytes), in numpy `shape` (the
    reverse of GGUF's dims: rows of the first GGUF dim are the last axis)."""
    raw = np.asarray(raw, dtype=np.uint8)
    if kind == "F32":
        out = raw.view(np.float32)
    elif kind == "F16":
        out = raw.view(np.float16).astype(np.float32)
    elif kind == "BF16":
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        _, block, nbytes = next(t for t in GGML_TYPES.values() if t[0] == kind)
        out = _DEQUANTIZE[kind](raw.reshape(-1, nbytes))
    return out.reshape(shape)


def q8_0_affine(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A Q8_0 tensor of numpy `shape` (rows, K) in MLX's 8-bit affine form, as mx.load makes it of a llama file:
    values q + 128 packed four to a uint32 from the low byte up, and per group of 32 a float16 scale d and bias
    -128 d. Exact: scale * (q + 128) + bias = d q. None where a bias would not fit a float16 (|d| > 511)."""
    rows, k = shape
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    scales = b[:, 0:2].copy().view(np.float16).reshape(rows, k // 32)
    if np.abs(scales.astype(np.float32)).max(initial=0.0) > 511:
        return None
    values = np.ascontiguousarray(b[:, 2:34] ^ 0x80)  # int8 q -> uint8 q + 128
    return values.reshape(rows, k).view(np.uint32), scales, (scales.astype(np.float32) * -128).astype(np.float16)
