"""Predicted pre-norm pre-RoPE K/V -> ordinary mlx-lm cache objects for the base model."""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .attention import finish_keys, kv_heads, split_heads


def write_predicted_kv(base_layers: Sequence[nn.Module], caches: Sequence[Any], keys: Sequence[mx.array],
                       values: Sequence[mx.array], *, backend=None) -> None:
    """Append predicted K/V (B, L, n_kv*hd) for the next L positions to each base layer's cache.

    Keys get the base layer's k-norm (if any) and RoPE at the cache's current offset, as the base itself
    would have done; values are stored as predicted. A RotatingKVCache (a sliding-window layer) gets only the
    positions its window keeps (skip_outside_window). A `backend` (backends.Backend) may append some layers itself
    (append_kv); MLX appends the rest.
    """
    done_by_backend = backend.append_kv(base_layers, caches, keys, values) if backend else [False] * len(caches)
    for layer, cache, k, v, done in zip(base_layers, caches, keys, values, done_by_backend):
        if done:
            continue
        n_kv, _ = kv_heads(layer)
        skip = skip_outside_window(cache, k.shape[1])
        k = finish_keys(layer, split_heads(k[:, skip:], n_kv), cache.offset)
        cache.update_and_fetch(k, split_heads(v[:, skip:], n_kv))


def skip_outside_window(cache: Any, rows: int) -> int:
    """How many of `rows` positions about to be appended to `cache` to skip: for a RotatingKVCache of window W
    (keeping no leading positions), all but the last W (later queries see the last W - 1; mlx-lm's single-token
    update expects a full buffer once the offset has passed W). They are skipped, and so is everything the cache
    held, with its offset moved past them, as if they had been written and rotated out."""
    if not isinstance(cache, RotatingKVCache) or cache.keep or rows <= cache.max_size:
        return 0
    skip = rows - cache.max_size
    cache.keys = cache.values = None
    cache.offset += skip
    cache._idx = 0
    return skip


def keep_window(cache: KVCache, window: int) -> RotatingKVCache:
    """The RotatingKVCache of `window` that a sliding-window layer would hold after the positions `cache` holds (all
    of them, from 0): the last `window`, written as _predict_into writes them (skip_outside_window)."""
    rotating = RotatingKVCache(max_size=window)
    n = cache.offset
    skip = skip_outside_window(rotating, n)
    if n > skip:
        rotating.update_and_fetch(cache.keys[:, :, skip:n], cache.values[:, :, skip:n])
    return rotating


def session_cache(model: nn.Module) -> list[KVCache]:
    """One KVCache per block, sliding-window layers included (their masks keep the window: mlx-lm's KVCache masks
    by window where a RotatingKVCache drops): a chat session keeps every position, so it can fork, trim and repair
    at any one. One-shot generation uses the model's own caches (make_prompt_cache)."""
    return [KVCache() for _ in model.layers]
