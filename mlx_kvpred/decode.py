"""A compiled one-token decode step for llama-style mlx-lm models (llama, qwen2, qwen3).

On the CPU, a decode step of the stock model code is some 4400 small MLX primitives for its ~210 matmuls
(`mx.fast.rms_norm` and `mx.fast.rope` run as graphs of elementwise ops there). `compiled_decoder` runs each block
as two compiled functions, the one-row norm / Q K V / RoPE before the cache and the O projection / norm / MLP after
it, with the cache update and attention between them uncompiled: the cache is then updated in place, as mlx-lm's
caches are, and attention reads only the filled part. Outputs equal the model's own to fp32 rounding.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import backbone, lm_head_of
from .cpu_ops import _exp_shifted

ENV_VAR = "KVPRED_COMPILED_DECODE"  # "0": decode with the model's own code
# mlx-lm modules whose blocks are x + attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)), with
# q/k/v/o projections, optional q_norm/k_norm over each head, and rope(x, offset=...) before the cache.
SUPPORTED_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")

_enabled: bool | None = None  # None: the default (on for the CPU, where it was measured)


def compiled_decode_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    if os.environ.get(ENV_VAR, "") == "0":
        return False
    return mx.default_device() == mx.cpu


def set_compiled_decode(enabled: bool | None) -> bool:
    """Decode with the compiled step (True), the model's own code (False) or the default (None); returns the
    previous setting. Read when a generation starts."""
    global _enabled
    was = compiled_decode_enabled()
    _enabled = enabled
    return was


def _rotate(x: mx.array, cos: mx.array, sin: mx.array, traditional: bool) -> mx.array:
    """nn.RoPE of one position over rows x (H, D): pairs are (2i, 2i + 1) when `traditional`, else (i, i + half)."""
    half = cos.shape[-1]
    rot, rest = x[:, :2 * half], x[:, 2 * half:]
    if traditional:
        pairs = rot.reshape(x.shape[0], half, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape[0], 2 * half)
    else:
        x1, x2 = rot[:, :half], rot[:, half:]
        out = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return mx.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _rope_angles(rope: nn.RoPE, offset: mx.array) -> tuple[mx.array, mx.array]:
    """cos and sin (half,) of nn.RoPE's angles at position `offset`, for every layer of a step."""
    half = rope.dims // 2
    freqs = mx.exp(-mx.arange(half, dtype=mx.float32) * (math.log(rope.base) / half))
    angles = (offset * rope.scale).astype(mx.float32) * freqs
    return mx.cos(angles), mx.sin(angles)


def _attention_inputs(layer: nn.Module, x: mx.array, position) -> tuple[mx.array, mx.array, mx.array]:
    """Block input (1, d) -> queries (1, Hkv, group, D) times the attention's scale, keys and values
    (1, Hkv, 1, D); keys and queries RoPE'd at `position` ((cos, sin) for nn.RoPE, else the offset)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    n_q, n_kv = attn.n_heads, attn.n_kv_heads
    q = attn.q_proj(h).reshape(n_q, -1)
    k = attn.k_proj(h).reshape(n_kv, -1)
    v = attn.v_proj(h).reshape(1, n_kv, 1, -1)
    if "q_norm" in attn:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if isinstance(position, tuple):
        q, k = _rotate(q, *position, attn.rope.traditional), _rotate(k, *position, attn.rope.traditional)
    else:  # (1, H, 1, D) is the layout the rope module expects
        q = attn.rope(q.reshape(1, n_q, 1, -1), offset=position)
        k = attn.rope(k.reshape(1, n_kv, 1, -1), offset=position)
    return (q * attn.scale).reshape(1, n_kv, n_q // n_kv, -1), k.reshape(1, n_kv, 1, -1), v


def _attend(queries: mx.array, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """Grouped queries (1, Hkv, group, D) over the cache (1, Hkv, S, D): (P V, the row sums of P), P unnormalized."""
    scores = queries @ keys.swapaxes(-1, -2)
    e = _exp_shifted(scores, scores.max(axis=-1, keepdims=True))
    return e @ values, e.sum(axis=-1, keepdims=True)


def _block_output(layer: nn.Module, x: mx.array, pv: mx.array, row_sums: mx.array) -> mx.array:
    """Block input (1, d) and its attention's P V and row sums -> the block's output (1, d)."""
    h = x + layer.self_attn.o_proj((pv / row_sums).reshape(1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class CompiledDecoder:
    """Called like the model (`decoder(tokens, cache=cache)` -> logits) by mlx-lm's generate_step: one token with
    plain K/V caches takes the compiled step, anything else (several tokens, quantized caches) the model itself."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = backbone(model)
        self.head = lm_head_of(model)
        layers = self.inner.layers
        rope = layers[0].self_attn.rope
        # one table of angles per step where every layer has the same plain nn.RoPE
        self.plain_rope = all(type(b.self_attn.rope) is nn.RoPE and vars(b.self_attn.rope) == vars(rope)
                              for b in layers)
        self.angles = mx.compile(lambda offset: _rope_angles(rope, offset)) if self.plain_rope else None
        # each layer's parameters are its compiled functions' implicit inputs: read at every call, so weights
        # loaded later are used
        self.attention_inputs = [mx.compile(lambda x, p, layer=layer: _attention_inputs(layer, x, p), inputs=layer)
                                 for layer in layers]
        self.block_output = [mx.compile(lambda x, pv, s, layer=layer: _block_output(layer, x, pv, s), inputs=layer)
                             for layer in layers]
        head_params = [self.inner.norm, self.inner.embed_tokens] + ([model.lm_head] if "lm_head" in model else [])
        self.logits = mx.compile(lambda h: self.head(self.inner.norm(h)), inputs=head_params)

    def __getattr__(self, name: str):  # generate_step and make_prompt_cache read model attributes (layers, ...)
        return getattr(self.model, name)

    def __call__(self, inputs: mx.array, cache: Sequence[Any] | None = None, input_embeddings=None, **kwargs):
        if (inputs.shape != (1, 1) or cache is None or input_embeddings is not None or kwargs
                or any(hasattr(c, "bits") for c in cache)):
            return self.model(inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)
        x = self.inner.embed_tokens(inputs[0])
        positions: dict[int, Any] = {}  # cache offset -> what _attention_inputs takes
        for pre, post, c in zip(self.attention_inputs, self.block_output, cache):
            position = positions.get(c.offset)
            if position is None:
                offset = mx.array(c.offset)
                position = positions[c.offset] = self.angles(offset) if self.plain_rope else offset
            q, k, v = pre(x, position)
            keys, values = c.update_and_fetch(k, v)
            x = post(x, *_attend(q, keys, values))  # not compiled: its shapes change every step
        return self.logits(x)[None]


def compiled_decoder(model: nn.Module) -> nn.Module | CompiledDecoder:
    """The compiled decoder of `model` (made once, kept on the model), or the model itself where the step is off
    (set_compiled_decode) or the architecture is not a supported one."""
    if not compiled_decode_enabled() or not supports(model):
        return model
    decoder = model.__dict__.get("_kvpred_decoder")
    if decoder is None:
        decoder = CompiledDecoder(model)
        object.__setattr__(model, "_kvpred_decoder", decoder)
    return decoder


def supports(model: nn.Module) -> bool:
    """The model is of a supported architecture, with its attention's usual parts and a plain LM head."""
    if type(model).__module__ not in SUPPORTED_MODULES or lm_head_of(model) is None:
        return False
    parts = ("q_proj", "k_proj", "v_proj", "o_proj", "rope")
    return all(all(n in b for n in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp"))
               and all(n in b.self_attn for n in parts) for b in backbone(model).layers)
