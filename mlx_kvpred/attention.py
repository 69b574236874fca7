"""Per-architecture access to mlx-lm attention layers: where K/V are projected, their shapes, k-norm and RoPE.

KV Prediction works on *pre-norm, pre-RoPE* keys (the projection outputs), which mlx-lm never caches.
`tap_kv` swaps a layer's K/V projection for a thin wrapper that records those outputs, or replaces them
with given (predicted) ones, so the stock mlx-lm model code runs unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from .errors import KVPredError


def attention_of(layer: nn.Module) -> nn.Module:
    """The attention module of a transformer block (llama/qwen: self_attn, openelm: attn)."""
    for name in ("self_attn", "attn", "attention"):
        if name in layer:
            return layer[name]
    raise KVPredError(f"unsupported layer type {type(layer).__module__}: no self_attn/attn module")


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head (llama/qwen: .model, openelm: .transformer): returns the final normed
    hidden state, the input of predictor input "hidden"."""
    for name in ("model", "transformer"):
        if name in model and isinstance(model[name], nn.Module):
            return model[name]
    raise KVPredError(f"unsupported model type {type(model).__module__}: no .model/.transformer backbone")


# Architectures whose logits are exactly the LM head (or tied embedding) applied to the backbone's output, and the
# name of their tie flag (in model.args, or on the model where mlx-lm sets it there: gemma3).
_PLAIN_HEAD_MODULES = {"mlx_lm.models.llama": "tie_word_embeddings", "mlx_lm.models.qwen2": "tie_word_embeddings",
                       "mlx_lm.models.qwen3": "tie_word_embeddings",
                       "mlx_lm.models.openelm": "share_input_output_layers",
                       "mlx_lm.models.gemma3_text": "tie_word_embeddings"}
# Architectures whose backbone scales the token embedding by sqrt(hidden size) before block 0 (as a bfloat16 number).
_SCALED_EMBEDDING_MODULES = {"mlx_lm.models.gemma3_text"}
# Architectures whose backbone reads its global mask from block sliding_window_pattern - 1 (by index).
_INDEXED_MASK_MODULES = {"mlx_lm.models.gemma3_text"}


def lm_head_of(model: nn.Module):
    """The function from the backbone's output to logits (the LM head or the tied embedding), or None where the
    model's __call__ does more than that (softcapping, scaling) or is not known."""
    tie = _PLAIN_HEAD_MODULES.get(type(model).__module__)
    if tie is None:
        return None
    if getattr(model.args, tie, None) or (not hasattr(model.args, tie) and getattr(model, tie)):
        inner = backbone(model)
        return (inner.embed_tokens if "embed_tokens" in inner else inner.token_embeddings).as_linear
    return model.lm_head


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """The residual stream entering block 0 for `tokens` (B, L): the token embedding, scaled where the architecture
    scales it (gemma3), as the model's own backbone computes it."""
    inner = backbone(model)
    h = (inner.embed_tokens if "embed_tokens" in inner else inner.token_embeddings)(tokens)
    if type(model).__module__ in _SCALED_EMBEDDING_MODULES:
        h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    return h


def runs_alone(model: nn.Module) -> bool:
    """Whether mlx-lm's own call runs `model`: gemma3's backbone reads its global mask from block
    sliding_window_pattern - 1, so a layer-pruned aux with fewer blocks runs only inside kvp (run_blocks)."""
    pattern = getattr(getattr(model, "args", None), "sliding_window_pattern", 1)
    return type(model).__module__ not in _INDEXED_MASK_MODULES or len(model.layers) >= pattern


def sliding_window(model: nn.Module, layer: nn.Module) -> int | None:
    """The attention window of a block: the model's sliding window for its local layers (llama's layer_types,
    gemma3's five local layers of six), None for global ones."""
    if getattr(layer, "use_sliding", False) or getattr(attention_of(layer), "is_sliding", False):
        return model.args.sliding_window
    return None


def windows(model: nn.Module) -> list[int | None]:
    """Each block's attention window (sliding_window), None for global attention."""
    return [sliding_window(model, layer) for layer in model.layers]


def run_blocks(model: nn.Module, h: mx.array, caches: Sequence[Any] | None = None, *, first: int = 0,
               stop: int | None = None) -> mx.array:
    """Blocks first..stop - 1 of `model` over `h` (B, L, d), the residual stream entering block `first`, with their
    `caches` (one per block run, or None): the stream leaving block stop - 1 (no final norm). Each block gets the
    mask of its attention's kind, made from the first cache of that kind, as mlx-lm's backbones make them; the
    backbone's own call would pick masks by list index and scale `h` again as an embedding (gemma3)."""
    layers = backbone(model).layers[first:stop]
    caches = [None] * len(layers) if caches is None else caches
    masks: dict[int | None, Any] = {}
    for layer, cache in zip(layers, caches):
        window = sliding_window(model, layer)
        if window not in masks:
            masks[window] = create_attention_mask(h, cache, window_size=window)
        h = layer(h, masks[window], cache)
    return h


def hidden_dim(model: nn.Module) -> int:
    """Width of the model's hidden state (its token embedding width)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedEmbedding):
            return m.dims
        if isinstance(m, nn.Embedding):
            return m.weight.shape[1]
    raise KVPredError(f"{type(model).__module__}: no token embedding to read the hidden width from")


def _fused(attn: nn.Module) -> bool:
    if "k_proj" in attn and "v_proj" in attn:
        return False
    if "qkv_proj" in attn:
        return True
    raise KVPredError(f"unsupported attention {type(attn).__module__}: no k_proj/v_proj or qkv_proj")


def _out_dim(proj: nn.Module) -> int:
    if "linear" in proj:  # mlx-lm's LoRALinear (an aux with LoRA factors)
        proj = proj.linear
    return proj.weight.shape[0]  # also right for QuantizedLinear (packed along the input dim)


def kv_heads(layer: nn.Module) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of a transformer block's attention."""
    attn = attention_of(layer)
    n_kv = attn.n_kv_heads
    if _fused(attn):
        return n_kv, attn.head_dim
    return n_kv, _out_dim(attn.k_proj) // n_kv


def kv_dims(layers: Sequence[nn.Module]) -> list[int]:
    """Merged-heads K (= V) width of every layer: n_kv_heads * head_dim."""
    return [h * d for h, d in map(kv_heads, layers)]


def finish_keys(layer: nn.Module, keys: mx.array, offset: int) -> mx.array:
    """Pre-norm pre-RoPE keys (B, n_kv, L, hd) -> what mlx-lm caches: the layer's k-norm, then RoPE at offset."""
    attn = attention_of(layer)
    if "k_norm" in attn:
        keys = attn.k_norm(keys)
    return attn.rope(keys, offset=offset)


@contextmanager
def swapped(module: nn.Module, name: str, value) -> Iterator[None]:
    """Within: `module.name` is `value` (e.g. a backbone's layer list cut to some blocks), then restored."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def split_heads(x: mx.array, n_heads: int) -> mx.array:
    """(B, L, n*hd) -> (B, n, L, hd), the cache layout."""
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(0, 2, 1, 3)


@dataclass
class KVRecord:
    """Pre-norm pre-RoPE K and V (B, L, n_kv*hd) per tapped layer, in call order (one entry per call)."""

    keys: list[list[mx.array]] = field(default_factory=list)
    values: list[list[mx.array]] = field(default_factory=list)


class _KVTap(nn.Module):
    """Wraps a K, V or fused QKV projection: records its K/V slices, optionally replaces them."""

    def __init__(self, proj: nn.Module, *, index: int, record: KVRecord, split: tuple[int, int] | None,
                 kind: str, override=None):
        super().__init__()
        self.proj = proj
        self._index, self._record, self._split, self._kind, self._override = index, record, split, kind, override

    def __call__(self, x: mx.array) -> mx.array:
        y = self.proj(x)
        i, rec = self._index, self._record
        if self._split is None:  # separate k_proj / v_proj
            if self._override is not None:
                y = self._override(self._kind, i, y)
            (rec.keys if self._kind == "k" else rec.values)[i].append(y)
            return y
        q_end, k_end = self._split
        q, k, v = y[..., :q_end], y[..., q_end:k_end], y[..., k_end:]
        if self._override is not None:
            k, v = self._override("k", i, k), self._override("v", i, v)
            y = mx.concatenate([q, k, v], axis=-1)
        rec.keys[i].append(k)
        rec.values[i].append(v)
        return y


@contextmanager
def tap_kv(layers: Sequence[nn.Module], *, override=None) -> Iterator[KVRecord]:
    """Record pre-norm pre-RoPE K/V of `layers` while the block runs.

    `override(kind, layer_index, projected) -> array`, if given, replaces K ("k") or V ("v") before the
    model uses it (training: the base attends to predicted K/V). The original projections are restored on exit.
    """
    record = KVRecord([[] for _ in layers], [[] for _ in layers])
    restore = []
    try:
        for i, layer in enumerate(layers):
            attn = attention_of(layer)
            if _fused(attn):
                n_q, n_kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
                split = (n_q * hd, (n_q + n_kv) * hd)
                restore.append((attn, "qkv_proj", attn.qkv_proj))
                attn.qkv_proj = _KVTap(attn.qkv_proj, index=i, record=record, split=split, kind="qkv",
                                       override=override)
            else:
                for kind, name in (("k", "k_proj"), ("v", "v_proj")):
                    restore.append((attn, name, attn[name]))
                    setattr(attn, name, _KVTap(attn[name], index=i, record=record, split=None, kind=kind,
                                               override=override))
        yield record
    finally:
        for attn, name, proj in reversed(restore):
            setattr(attn, name, proj)
