"""Which prompt positions matter to its end, as SpecPrefill scores them (Liu et al., arXiv 2502.02789).

A small model's attention from the last prompt tokens (the question) to every earlier position, per layer and head,
is smoothed along the positions, its maximum taken over layers and heads and its mean over the query tokens; the
prompt is then kept in chunks, the chunks of highest mean score first. SpecPrefill's base prefills only the kept
positions (mode "specprefill"); kvp's `exact_keep` recomputes their K/V exactly (positions.py), after carrying each
score a few positions forward (carry_forward): a fact's value follows the words a question attends to.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import attention_of, swapped

DEFAULT_POOL = 13  # positions each score is averaged over (SpecPrefill's smoothing kernel)
DEFAULT_CHUNK = 16  # positions kept or dropped together
DEFAULT_FOLLOW = 8  # exact keep: positions after each one that take its score (docs/facts.md: needle recall)


class _QueryRecorder(nn.Module):
    """An attention's rope module that also keeps what it rotates first in each call: mlx-lm's llama, qwen, gemma and
    openelm attention rotate the queries, then the keys."""

    def __init__(self, rope: nn.Module, record: list):
        super().__init__()
        self.rope = rope
        self._record, self._calls = record, 0

    def __call__(self, x: mx.array, offset=0, **kwargs) -> mx.array:
        y = self.rope(x, offset=offset, **kwargs)
        if self._calls % 2 == 0:
            self._record.append(y)
        self._calls += 1
        return y


@contextmanager
def tap_queries(layers: Sequence[nn.Module]) -> Iterator[list[list[mx.array]]]:
    """Within: each layer's rotated queries (B, n_heads, L, head_dim), one entry per call, are recorded."""
    records: list[list[mx.array]] = [[] for _ in layers]
    with ExitStack() as stack:
        for layer, record in zip(layers, records):
            attn = attention_of(layer)
            stack.enter_context(swapped(attn, "rope", _QueryRecorder(attn.rope, record)))
        yield records


def attention_scores(layers: Sequence[nn.Module], queries: Sequence[mx.array], keys: Sequence[mx.array], *,
                     end: int, pool: int = DEFAULT_POOL, exp: Callable[[mx.array], mx.array] = mx.exp,
                     windows: Sequence[int | None] | None = None) -> mx.array:
    """Importance (end,) of positions 0..end-1: `queries[i]` (1, n_heads, w, D) are layer i's rotated queries of the
    last w prompt tokens, `keys[i]` (1, n_kv, S, D) its cached keys of the whole prompt (those queries' own last).
    Softmax over each query's causal context (within its window where `windows` gives layer i one), averaged over
    `pool` neighbouring positions, max over layers and heads, mean over the w queries. `exp`: the backend's
    (backend.loss_ops; MLX's CPU exp is scalar)."""
    q = mx.stack([x[0] for x in queries])  # (layers, n_heads, w, D)
    k = mx.stack([x[0] for x in keys])  # (layers, n_kv, S, D)
    n_layers, n_q, w, d = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    scale = mx.array([attention_of(layer).scale for layer in layers], dtype=q.dtype)[:, None, None, None, None]
    # the query heads sharing a kv head, stacked as rows of one product (a broadcast kv axis ran 1.5x slower on CPU)
    scores = ((q.reshape(n_layers, n_kv, n_q // n_kv * w, d) * scale[..., 0]) @ k.swapaxes(-1, -2)).reshape(
        n_layers, n_kv, n_q // n_kv, w, S)
    # (layers, w, S): how far back each layer's queries see (S: all of the prompt)
    reach = mx.array([size or S for size in (windows or [None] * n_layers)])[:, None, None]
    distance = mx.arange(S - w, S)[:, None] - mx.arange(S)[None]
    visible = (distance >= 0) & (distance < reach)
    scores = scores.astype(mx.float32) + mx.where(visible, 0.0, -1e30)[:, None, None]
    e = exp(scores - scores.max(axis=-1, keepdims=True))
    probs = (e[..., :end] / e.sum(axis=-1, keepdims=True)).reshape(n_layers * n_q, w, end)
    return smooth(probs, pool).max(axis=0).mean(axis=0)


def smooth(x: mx.array, pool: int) -> mx.array:
    """Mean over a window of `pool` positions centred on each one, along the last axis (zeros beyond the ends)."""
    if pool <= 1:
        return x
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(pool // 2 + 1, pool - pool // 2 - 1)])
    csum = mx.cumsum(padded, axis=-1)
    return (csum[..., pool:] - csum[..., :-pool]) / pool


def carry_forward(scores: mx.array, follow: int = DEFAULT_FOLLOW) -> mx.array:
    """Each position's score raised to the highest of the `follow` positions before it, so that what follows an
    attended position (the number after "the number of the kettle is") is kept with it."""
    out = scores
    for d in range(1, min(follow, scores.shape[0] - 1) + 1):
        out = mx.maximum(out, mx.pad(scores[:-d], [(d, 0)]))
    return out


def select_positions(scores: mx.array, *, keep: float, chunk: int = DEFAULT_CHUNK,
                     always: Sequence[int] = ()) -> mx.array:
    """Sorted positions (int32) of the ceil(keep * chunks) chunks of `chunk` positions with the highest mean score,
    plus `always`."""
    n = scores.shape[0]
    chunks = math.ceil(n / chunk)
    pad = chunks * chunk - n
    padded = mx.concatenate([scores, mx.zeros((pad,), scores.dtype)]) if pad else scores
    means = padded.reshape(chunks, chunk).sum(axis=1) / mx.minimum(chunk, n - mx.arange(chunks) * chunk)
    n_keep = min(chunks, math.ceil(keep * chunks)) if keep > 0 else 0
    chosen = sorted(mx.argsort(-means)[:n_keep].tolist())
    kept = {p for c in chosen for p in range(c * chunk, min((c + 1) * chunk, n))}
    kept.update(p for p in always if 0 <= p < n)
    return mx.array(sorted(kept), dtype=mx.int32)
