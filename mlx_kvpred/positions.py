"""Base layers over chosen prompt positions, each row at its own position.

Two uses. kvp's exact keep (`recompute_at`): rows at scattered positions of a cache that already holds predicted K/V
for every position; each row's exact K/V replace the predicted ones at its position and it attends to every
position up to its own (the last W of them in a sliding-window layer of window W). SpecPrefill (`compact_cache`):
only the kept positions are cached, side by side; RoPE only sees differences of positions, so each kept row is
rotated at its position minus the number of dropped ones before the prompt's end, and the positions after it (the
exact tail, decoding) follow on at the cache's offset as usual.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import attention_of, swapped
from .rope_layout import pair_partners, rope_key, rotation_layout


class PositionedRoPE(nn.Module):
    """A rope module that rotates row i of its input (B=1, H, L, D) at `positions[i]`, whatever offset it is given:
    by cos/sin tables read back from the module itself (rope_layout), made once per head width."""

    def __init__(self, rope: nn.Module, positions: mx.array, tables: dict | None = None):
        super().__init__()
        self.rope = rope
        self.positions = positions
        self._tables = {} if tables is None else tables  # head width -> (cos, signed sin)

    def __call__(self, x: mx.array, offset=0, **kwargs) -> mx.array:
        D = x.shape[-1]
        if D not in self._tables:
            unit, _, cos_at, sin_at, sign = rotation_layout(self.rope, D)
            # one row per batch entry, each at its own offset (a per-batch offset is what mx.fast.rope takes)
            r = self.rope(mx.broadcast_to(unit, (self.positions.size, 1, 1, D)), offset=self.positions)[:, 0, 0]
            self._tables[D] = (r[:, cos_at], r[:, sin_at] * sign)
        cos, sin = self._tables[D]
        return x * cos + pair_partners(x, self.rope) * sin


@contextmanager
def rotated_at(layers: Sequence[nn.Module], positions: mx.array) -> Iterator[None]:
    """Within: `layers`' attention rotates the rows of each call at `positions` (layers whose rope modules rotate
    alike share tables)."""
    shared: dict[str, dict] = {}
    with ExitStack() as stack:
        for layer in layers:
            attn = attention_of(layer)
            tables = shared.setdefault(repr(rope_key(attn.rope)), {})  # repr: the key holds lists and sets
            stack.enter_context(swapped(attn, "rope", PositionedRoPE(attn.rope, positions, tables)))
        yield


class ScatteredCache:
    """A KVCache seen through rows at `positions`: update_and_fetch writes their K/V at those positions and returns the
    cache's first `end` positions."""

    def __init__(self, cache: Any, positions: mx.array, end: int):
        self.cache, self.positions, self.end = cache, positions, end
        self.offset = end

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        c = self.cache
        c.keys[:, :, self.positions] = keys.astype(c.keys.dtype)
        c.values[:, :, self.positions] = values.astype(c.values.dtype)
        return c.keys[:, :, :self.end], c.values[:, :, :self.end]


def recompute_at(layers: Sequence[nn.Module], caches: Sequence[Any], hidden: mx.array, positions: mx.array,
                 end: int, windows: Sequence[int | None] | None = None) -> mx.array:
    """Run `layers` over `hidden` (1, n, d), the residual stream entering them at `positions` (sorted, < end):
    each layer's K/V of those rows replace what `caches` (KVCaches holding every position) hold there, and a row
    attends to positions 0..its own of the first `end`, or to the last `windows[i]` of them in a sliding-window
    layer. Returns the stream after the layers."""
    distance = positions[:, None] - mx.arange(end)[None]  # (n, end)
    masks = {None: distance >= 0}
    windows = windows or [None] * len(layers)
    with rotated_at(layers, positions):
        for layer, cache, window in zip(layers, caches, windows):
            if window not in masks:
                masks[window] = (distance >= 0) & (distance < window)
            hidden = layer(hidden, masks[window], cache=ScatteredCache(cache, positions, end))
            mx.eval(hidden, cache.keys, cache.values)
    return hidden


def compact_shift(positions: mx.array, end: int) -> int:
    """How far kept `positions` (all below `end`) are moved back so that they end where the cache's offset does:
    the dropped positions below `end`."""
    return end - positions.size


def compact_cache(cache: Any, rope: nn.Module, positions: mx.array, shift: int) -> None:
    """Keep only `positions` of a KVCache holding K/V rotated at their true positions, side by side, their keys
    rotated back by `shift` positions (RoPE rotations add up)."""
    keys = cache.keys[:, :, positions]
    if shift:
        keys = PositionedRoPE(rope, mx.full((positions.size,), -shift, dtype=mx.int32))(keys)
    cache.keys, cache.values, cache.offset = keys, cache.values[:, :, positions], positions.size
