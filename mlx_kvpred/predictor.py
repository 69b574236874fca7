"""KVPredictor: per base layer, a Linear (with bias) for keys and one for values.

Inputs (`PredictorConfig.input`): "kv" (CoreNet) reads the mapped aux layer's K for keys and its V for values;
"hidden" reads the aux's last hidden state (after its final norm) for both, a strictly richer input for KVP-LP.
Exact layers (KVP-LP with a frozen aux: base layers the aux runs itself) copy that aux layer's K/V, no weights.
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
    input: str = "kv"  # "kv": aux K -> base K, aux V -> base V; "hidden": the aux's final normed hidden state
    aux_hidden_dim: int | None = None  # width of that hidden state (input "hidden")
    exact_layers: tuple[int, ...] = ()  # base layers whose K/V are aux layer layer_map[i]'s, copied unchanged

    def __post_init__(self):
        n_aux, n_base = len(self.aux_kv_dims), len(self.base_kv_dims)
        if len(self.layer_map) != n_base:
            raise KVPredError(f"layer map has {len(self.layer_map)} entries, the base has {n_base} layers")
        bad = [j for j in self.layer_map if not 0 <= j < n_aux]
        if bad:
            raise KVPredError(f"layer map reads aux layers {bad}, the aux has {n_aux} layers (0..{n_aux - 1})")
        if self.input not in PREDICTOR_INPUTS:
            raise KVPredError(f"predictor input must be one of {', '.join(PREDICTOR_INPUTS)}, got {self.input!r}")
        if self.input == "hidden" and not self.aux_hidden_dim:
            raise KVPredError("predictor input 'hidden' needs the aux hidden width (aux_hidden_dim)")
        bad = [i for i in self.exact_layers if not 0 <= i < n_base
               or self.aux_kv_dims[self.layer_map[i]] != self.base_kv_dims[i]]
        if bad:
            raise KVPredError(f"exact layers {bad} are not base layers with the K/V width of their aux layer")

    def in_dim(self, i: int) -> int:
        """Input width of base layer i's K/V transforms."""
        return self.aux_hidden_dim if self.input == "hidden" else self.aux_kv_dims[self.layer_map[i]]


PREDICTOR_INPUTS = ("kv", "hidden")


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
        b, exact = config.base_kv_dims, set(config.exact_layers)

        def transform(i: int) -> nn.Module:
            return nn.Identity() if i in exact else nn.Linear(config.in_dim(i), b[i])

        self.key_transforms = [transform(i) for i in range(len(b))]
        self.value_transforms = [transform(i) for i in range(len(b))]

    @property
    def linear_layers(self) -> list[int]:
        """Base layers with learned transforms (all but the exact ones)."""
        return [i for i in range(len(self.key_transforms)) if i not in set(self.config.exact_layers)]

    def predict_layer(self, i: int, aux_keys: list[mx.array], aux_values: list[mx.array],
                      aux_hidden: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Base layer i's pre-norm pre-RoPE K and V (B, L, base_kv_dim) from the aux K/V (B, L, aux_kv_dim)
        or, for input "hidden", the aux's final normed hidden state (B, L, aux_hidden_dim)."""
        j = self.config.layer_map[i]
        if self.config.input == "kv" or i in self.config.exact_layers:
            return self.key_transforms[i](aux_keys[j]), self.value_transforms[i](aux_values[j])
        if aux_hidden is None:
            raise ValueError("this predictor reads the aux hidden state: pass aux_hidden")
        return self.key_transforms[i](aux_hidden), self.value_transforms[i](aux_hidden)

    def __call__(self, aux_keys: list[mx.array], aux_values: list[mx.array],
                 aux_hidden: mx.array | None = None) -> tuple[list[mx.array], list[mx.array]]:
        kv = [self.predict_layer(i, aux_keys, aux_values, aux_hidden) for i in range(len(self.key_transforms))]
        return [k for k, _ in kv], [v for _, v in kv]

    def set_identity(self) -> "KVPredictor":
        """Identity K/V maps (zero bias); only where aux and base widths agree. Used for exactness checks and init."""
        for i in self.linear_layers:
            self._set_identity(self.key_transforms[i])
            self._set_identity(self.value_transforms[i])
        return self

    @staticmethod
    def _set_identity(lin: nn.Linear) -> None:
        out_dim, in_dim = lin.weight.shape
        if out_dim != in_dim:
            raise KVPredError(f"identity predictor needs equal widths, got {in_dim} -> {out_dim}")
        lin.weight = mx.eye(out_dim, dtype=lin.weight.dtype)
        lin.bias = mx.zeros((out_dim,), dtype=lin.weight.dtype)
