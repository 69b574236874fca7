"""Low-rank (LoRA) deltas on the aux's layers, so training can adapt the aux to produce K/V that predict the
base's better. The wrapped weights stay the base's shared arrays (KVP-LP); a bundle stores only the factors.
Uses mlx-lm's LoRALinear: y = W x + scale * (x A) B, with B = 0 at the start (the aux is unchanged)."""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import KVPredError


def add_aux_lora(aux: nn.Module, *, rank: int, scale: float) -> list[str]:
    """Wrap every (quantized) Linear inside `aux.layers` in a LoRALinear; returns the wrapped module paths."""
    from mlx_lm.tuner.lora import LoRALinear

    if rank < 1:
        raise KVPredError(f"aux LoRA rank must be >= 1, got {rank}")
    wrapped = []
    for i, layer in enumerate(aux.layers):
        found = [(name, m) for name, m in layer.named_modules()
                 if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not name.endswith(".linear")]
        layer.update_modules(tree_unflatten([(name, LoRALinear.from_base(m, r=rank, scale=scale))
                                             for name, m in found]))
        wrapped += [f"layers.{i}.{name}" for name, _ in found]
    return wrapped


def is_lora_param(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))
