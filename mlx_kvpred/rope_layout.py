"""A rope module as a rotation of entry pairs: which entries pair up, and how its cos and sin are read back from
the module itself (so plain, llama3 and yarn RoPE all work), for RoPE at scattered positions (positions.py), the
compiled decode step and the C prefill RoPE."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def rope_key(rope: nn.Module) -> tuple:
    """What makes two rope modules rotate alike: their class, attributes and arrays (llama3's frequencies)."""
    items = sorted(vars(rope).items()) + sorted(rope.items())
    return (type(rope),) + tuple((k, v.tolist() if isinstance(v, mx.array) else v) for k, v in items)


def rotation_layout(rope: nn.Module, head_dim: int) -> tuple[mx.array, ...]:
    """For one head: the unit vector u whose RoPE gives (cos, sin) at every rotated pair, the pair partner of each
    entry (perm) and where each entry takes cos and sin from in rope(u) (cos_at, sin_at; sin's sign in sign)."""
    dims, half = rope.dims, rope.dims // 2
    idx = list(range(head_dim))
    if rope.traditional:  # pairs (2i, 2i + 1)
        first = [i % 2 == 0 for i in range(dims)]
        partner = [i + 1 if i % 2 == 0 else i - 1 for i in range(dims)]
    else:  # pairs (i, i + half)
        first = [i < half for i in range(dims)]
        partner = [i + half if i < half else i - half for i in range(dims)]
    unit = [1.0 if f else 0.0 for f in first] + [1.0] * (head_dim - dims)
    cos_at = [i if f else partner[i] for i, f in enumerate(first)] + idx[dims:]
    sin_at = [partner[i] if f else i for i, f in enumerate(first)] + idx[dims:]
    sign = [-1.0 if f else 1.0 for f in first] + [0.0] * (head_dim - dims)
    return (mx.array(unit), mx.array(partner + idx[dims:]), mx.array(cos_at), mx.array(sin_at), mx.array(sign))


def pair_partners(x: mx.array, rope: nn.Module) -> mx.array:
    """x[..., perm] of rotation_layout (each rotated entry's pair partner; the entries past rope.dims as they are), by
    slices: the gather costs 10-40x as much on a CPU."""
    dims, half = rope.dims, rope.dims // 2
    if rope.traditional:
        pairs = x[..., :dims].reshape(*x.shape[:-1], half, 2)
        swapped = mx.concatenate([pairs[..., 1:], pairs[..., :1]], axis=-1).reshape(*x.shape[:-1], dims)
    else:
        swapped = mx.concatenate([x[..., half:dims], x[..., :half]], axis=-1)
    return swapped if dims == x.shape[-1] else mx.concatenate([swapped, x[..., dims:]], axis=-1)
