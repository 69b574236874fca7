"""KVPredictor: per base layer, a Linear (with bias) for keys and one for values.

Inputs (`PredictorConfig.input`): "kv" (CoreNet) reads the mapped aux layer's K for keys and its V for values;
"hidden" reads the aux's last hidden state (after its final norm) for both, a strictly richer input for KVP-LP;
with `prev_token_dim` it also reads a shared low-rank projection of the previous token's hidden state (one
token of context; docs/training.md has the measurements).
Exact layers (KVP-LP with a frozen aux: base layers the aux runs itself) copy that aux layer's K/V, no weights.
Weight names mirror CoreNet's `auxkv_to_basekv.{key,value}_transforms.{i}` so checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

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
    prev_token_dim: int = 0  # input "hidden": width of the previous token's projected hidden state (0: none)

    def __post_init__(self):
        n_aux, n_base = len(self.aux_kv_dims), len(self.base_kv_dims)
        if len(self.layer_map) != n_base:
            raise KVPredError(f"layer map has {len(self.layer_map)} entries, the base has {n_base} layers")
        bad = [j for j in self.layer_map if not 0 <= j < n_aux]
        if bad:
            raise KVPredError(f"layer map reads aux layers {bad}, the aux has {n_aux} layers (0..{n_aux - 1})")
        check_predictor_input(self.input, self.prev_token_dim, self.aux_hidden_dim)
        if self.input == "hidden" and not self.aux_hidden_dim:
            raise KVPredError("predictor input 'hidden' needs the aux hidden width (aux_hidden_dim)")
        bad = [i for i in self.exact_layers if not 0 <= i < n_base
               or self.aux_kv_dims[self.layer_map[i]] != self.base_kv_dims[i]]
        if bad:
            raise KVPredError(f"exact layers {bad} are not base layers with the K/V width of their aux layer")

    def in_dim(self, i: int) -> int:
        """Input width of base layer i's K/V transforms."""
        if self.input == "hidden":
            return self.aux_hidden_dim + self.prev_token_dim
        return self.aux_kv_dims[self.layer_map[i]]


PREDICTOR_INPUTS = ("kv", "hidden")


def check_predictor_input(input: str, prev_token_dim: int, aux_hidden_dim: int | None = None, *,
                          input_name: str = "predictor input", dim_name: str = "prev_token_dim") -> None:
    """The predictor's input options (named as the caller's user knows them: config fields or CLI flags);
    `aux_hidden_dim` None skips the checks that need the aux."""
    if input not in PREDICTOR_INPUTS:
        raise KVPredError(f"{input_name} must be one of {', '.join(PREDICTOR_INPUTS)}, got {input!r}", input_name)
    if prev_token_dim < 0 or (prev_token_dim and input != "hidden"):
        raise KVPredError(f"{dim_name} must be >= 0 and needs {input_name} hidden, got {prev_token_dim} "
                          f"with {input_name} {input}", dim_name, input_name)
    if aux_hidden_dim is not None and prev_token_dim > aux_hidden_dim:
        raise KVPredError(f"{dim_name} {prev_token_dim} exceeds the aux hidden width {aux_hidden_dim}", dim_name)


def previous_positions(x: mx.array, before: mx.array | None = None) -> mx.array:
    """x (B, L, d) shifted one position later: row t holds row t-1; row 0 holds `before` (B, 1, d) or zeros."""
    first = mx.zeros_like(x[:, :1]) if before is None else before
    return mx.concatenate([first, x[:, :-1]], axis=1)


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
        if config.prev_token_dim:
            self.prev_token_proj = nn.Linear(config.aux_hidden_dim, config.prev_token_dim, bias=False)

    @property
    def linear_layers(self) -> list[int]:
        """Base layers with learned transforms (all but the exact ones)."""
        return [i for i in range(len(self.key_transforms)) if i not in set(self.config.exact_layers)]

    def hidden_input(self, aux_hidden: mx.array, prev_hidden: mx.array | None = None) -> mx.array:
        """Input of the "hidden" transforms (B, L, in_dim): the hidden state, then (with prev_token_dim) the
        projection of the previous position's; `prev_hidden` (B, 1, d) is the one before the first position
        (chunked prefill), zeros at the start of a sequence."""
        if not self.config.prev_token_dim:
            return aux_hidden
        projected = self.prev_token_proj(previous_positions(aux_hidden, prev_hidden))
        return mx.concatenate([aux_hidden, projected], axis=-1)

    def __call__(self, aux_keys: list[mx.array], aux_values: list[mx.array], aux_hidden: mx.array | None = None,
                 prev_hidden: mx.array | None = None) -> tuple[list[mx.array], list[mx.array]]:
        """Every base layer's pre-norm pre-RoPE K and V (B, L, base_kv_dim) from the aux K/V (B, L, aux_kv_dim)
        or, for input "hidden", the aux's final normed hidden state (B, L, aux_hidden_dim); see hidden_input."""
        x = None
        if self.config.input == "hidden" and self.linear_layers:
            if aux_hidden is None:
                raise ValueError("this predictor reads the aux hidden state: pass aux_hidden")
            x = self.hidden_input(aux_hidden, prev_hidden)
        keys, values, exact = [], [], set(self.config.exact_layers)
        for i, j in enumerate(self.config.layer_map):
            k_in, v_in = (aux_keys[j], aux_values[j]) if x is None or i in exact else (x, x)
            keys.append(self.key_transforms[i](k_in))
            values.append(self.value_transforms[i](v_in))
        return keys, values

    def predict_fused(self, aux_keys: list[mx.array], aux_values: list[mx.array], aux_hidden: mx.array | None = None,
                      prev_hidden: mx.array | None = None) -> tuple[list[mx.array], list[mx.array]]:
        """What __call__ returns, for inference: input "hidden" runs every learned transform as one GEMM (one
        read of the input, one large matmul instead of two per layer; stacks_hidden)."""
        if not self.stacks_hidden():
            return self(aux_keys, aux_values, aux_hidden, prev_hidden)
        if aux_hidden is None:
            raise ValueError("this predictor reads the aux hidden state: pass aux_hidden")
        weight, bias, splits = self.stacked_transforms()
        y = mx.addmm(bias, self.hidden_input(aux_hidden, prev_hidden), weight.T)
        parts = mx.split(y, splits, axis=-1)
        exact = set(self.config.exact_layers)
        keys = [aux_keys[j] if i in exact else None for i, j in enumerate(self.config.layer_map)]
        values = [aux_values[j] if i in exact else None for i, j in enumerate(self.config.layer_map)]
        for n, i in enumerate(self.linear_layers):
            keys[i], values[i] = parts[2 * n], parts[2 * n + 1]
        return keys, values

    def stacks_hidden(self) -> bool:
        """Whether the learned transforms run as one stacked product (stacked_transforms): input "hidden", two or
        more plain Linear layers."""
        layers = self.linear_layers
        return self.config.input == "hidden" and len(layers) >= 2 and all(
            type(self.key_transforms[i]) is nn.Linear and type(self.value_transforms[i]) is nn.Linear for i in layers)

    def stacked_transforms(self) -> tuple[mx.array, mx.array, list[int]]:
        """The learned transforms stacked: weight (sum of outs, in) and bias, each learned base layer's keys then
        values in layer order, and the split points of their outputs. The transforms' own weights and biases become
        slices of them (no second copy). Rebuilt whenever a transform's weights are replaced (training,
        set_identity)."""
        mods = [m for i in self.linear_layers for m in (self.key_transforms[i], self.value_transforms[i])]
        cached = self.__dict__.get("_stacked_cache")
        if cached is None or not all(a is b for a, b in zip(cached[0], self._transform_arrays(mods))):
            weight = mx.concatenate([m.weight for m in mods], axis=0)
            bias = mx.concatenate([m.bias for m in mods])
            ends = list(accumulate(m.weight.shape[0] for m in mods))
            for m, start, end in zip(mods, [0] + ends, ends):
                m.weight, m.bias = weight[start:end], bias[start:end]
            mx.eval(weight, bias, [(m.weight, m.bias) for m in mods])
            cached = (self._transform_arrays(mods), weight, bias, ends[:-1])  # compared by identity, so held
            self.__dict__["_stacked_cache"] = cached  # not a parameter: kept out of saved weights and updates
        return cached[1:]

    @staticmethod
    def _transform_arrays(mods: list[nn.Module]) -> list[mx.array]:
        return [m.weight for m in mods] + [m.bias for m in mods]

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
