"""KVPredictor: per base layer, a Linear (with bias) for keys and one for values, reading the mapped aux layer.

Weight names mirror CoreNet's `auxkv_to_basekv.{key,value}_transforms.{i}` so checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import KVPredError


@dataclass(frozen=True)
class PredictorConfig:
    aux_kv_dims: tuple[int, ...]  # merged-heads K/V width per aux layer
    base_kv_dims: tuple[int, ...]  # per base layer
    layer_map: tuple[int, ...]  # base layer i reads aux layer layer_map[i]

    def __post_init__(self):
        n_aux, n_base = len(self.aux_kv_dims), len(self.base_kv_dims)
        if len(self.layer_map) != n_base:
            raise KVPredError(f"layer map has {len(self.layer_map)} entries, the base has {n_base} layers")
        bad = [j for j in self.layer_map if not 0 <= j < n_aux]
        if bad:
            raise KVPredError(f"layer map reads aux layers {bad}, the aux has {n_aux} layers (0..{n_aux - 1})")


def spread_layers(n_base: int, n_keep: int) -> list[int]:
    """`n_keep` evenly spaced base layers starting at 0 (CoreNet KVP-LP: 0.25 of 28 -> 0,4,...,24)."""
    if not 1 <= n_keep <= n_base:
        raise KVPredError(f"cannot keep {n_keep} of {n_base} layers")
    return sorted({(i * n_base) // n_keep for i in range(n_keep)})


def layer_pruned_map(kept_layers: list[int], n_base: int) -> list[int]:
    """KVP-LP map: base layer i reads the aux copy of the largest kept layer <= i."""
    return [max(j for j, k in enumerate(kept_layers) if k <= i) if i >= kept_layers[0] else 0
            for i in range(n_base)]


def smaller_model_map(n_aux: int, n_base: int) -> list[int]:
    """KVP-C map (CoreNet): base layer i reads aux layer max(i // 2, i - (n_base - n_aux)), clipped."""
    return [min(n_aux - 1, max(i // 2, i - (n_base - n_aux))) for i in range(n_base)]


class KVPredictor(nn.Module):
    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        a, b = config.aux_kv_dims, config.base_kv_dims
        self.key_transforms = [nn.Linear(a[j], b[i]) for i, j in enumerate(config.layer_map)]
        self.value_transforms = [nn.Linear(a[j], b[i]) for i, j in enumerate(config.layer_map)]

    def predict_layer(self, i: int, aux_keys: list[mx.array], aux_values: list[mx.array]) -> tuple[mx.array, mx.array]:
        """Base layer i's pre-norm pre-RoPE K and V (B, L, base_kv_dim) from the aux K/V (B, L, aux_kv_dim)."""
        j = self.config.layer_map[i]
        return self.key_transforms[i](aux_keys[j]), self.value_transforms[i](aux_values[j])

    def __call__(self, aux_keys: list[mx.array], aux_values: list[mx.array]) -> tuple[list[mx.array], list[mx.array]]:
        kv = [self.predict_layer(i, aux_keys, aux_values) for i in range(len(self.key_transforms))]
        return [k for k, _ in kv], [v for _, v in kv]

    def set_identity(self) -> "KVPredictor":
        """Identity K/V maps (zero bias); only where aux and base widths agree. Used for exactness checks and init."""
        for lin in (*self.key_transforms, *self.value_transforms):
            out_dim, in_dim = lin.weight.shape
            if out_dim != in_dim:
                raise KVPredError(f"identity predictor needs equal widths, got {in_dim} -> {out_dim}")
            lin.weight = mx.eye(out_dim, dtype=lin.weight.dtype)
            lin.bias = mx.zeros((out_dim,), dtype=lin.weight.dtype)
        return self
