"""Predicted pre-norm pre-RoPE K/V -> ordinary mlx-lm cache objects for the base model."""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import finish_keys, kv_heads, split_heads


def write_predicted_kv(base_layers: Sequence[nn.Module], caches: Sequence[Any], keys: Sequence[mx.array],
                       values: Sequence[mx.array], *, backend=None) -> None:
    """Append predicted K/V (B, L, n_kv*hd) for the next L positions to each base layer's cache.

    Keys get the base layer's k-norm (if any) and RoPE at the cache's current offset, as the base itself
    would have done; values are stored as predicted. Works for KVCache and RotatingKVCache alike. A `backend`
    (backends.Backend) may append some layers itself (append_kv); MLX appends the rest.
    """
    done_by_backend = backend.append_kv(base_layers, caches, keys, values) if backend else [False] * len(caches)
    for layer, cache, k, v, done in zip(base_layers, caches, keys, values, done_by_backend):
        if done:
            continue
        n_kv, _ = kv_heads(layer)
        k = finish_keys(layer, split_heads(k, n_kv), cache.offset)
        cache.update_and_fetch(k, split_heads(v, n_kv))
