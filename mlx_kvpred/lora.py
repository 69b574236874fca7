"""Low-rank (LoRA) deltas on the aux's layers, so training can adapt the aux to feed the predictor better.
The wrapped weights stay the base's shared arrays (KVP-LP); a bundle stores only the factors.
Uses mlx-lm's LoRALinear: y = W x + scale * (x A) B, with B = 0 at the start (the aux is unchanged)."""

from __future__ import annotations

from typing import Sequence

import mlx.nn as nn
from mlx.utils import tree_unflatten

from .attention import attention_of
from .errors import KVPredError


def add_aux_lora(aux: nn.Module, *, rank: int, scale: float, layers: Sequence[int] | None = None,
                 frozen_kv: Sequence[int] = ()) -> list[str]:
    """Wrap every (quantized) Linear inside aux `layers` (default: all) in a LoRALinear, except the K/V
    projections (a fused QKV one included) of the layers in `frozen_kv`; returns the wrapped module paths."""
    from mlx_lm.tuner.lora import LoRALinear

    if rank < 1:
        raise KVPredError(f"aux LoRA rank must be >= 1, got {rank}")
    n = len(aux.layers)
    layers = range(n) if layers is None else layers
    bad = [i for i in [*layers, *frozen_kv] if not 0 <= i < n]
    if bad:
        raise KVPredError(f"aux LoRA layers {bad} are not aux layers (0..{n - 1})")
    wrapped = []
    for i in layers:
        layer = aux.layers[i]
        attn_name = next(name for name, m in layer.named_modules() if m is attention_of(layer))
        kv = {f"{attn_name}.{p}" for p in ("k_proj", "v_proj", "qkv_proj")} if i in frozen_kv else set()
        found = [(name, m) for name, m in layer.named_modules()
                 if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not name.endswith(".linear")
                 and name not in kv]
        layer.update_modules(tree_unflatten([(name, LoRALinear.from_base(m, r=rank, scale=scale))
                                             for name, m in found]))
        wrapped += [f"layers.{i}.{name}" for name, _ in found]
    return wrapped


def lora_layers(aux_lora: dict, n_aux: int) -> list[int]:
    """The aux layers a bundle's `aux_lora` config adapts (configs before "layers": all of them)."""
    return list(aux_lora.get("layers", range(n_aux)))


def unchanged_kv_layers(aux_lora: dict | None, n_aux: int) -> list[int]:
    """Aux layers whose K/V are still the base's under `aux_lora`: those before the first adapted layer, and
    that layer too when its K/V projections are frozen (its input is still the base's)."""
    if not aux_lora:
        return list(range(n_aux))
    first = min(lora_layers(aux_lora, n_aux))
    return list(range(first + (first in aux_lora.get("frozen_kv", ()))))


def is_lora_param(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))
