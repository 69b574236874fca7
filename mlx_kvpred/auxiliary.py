"""The aux model: a layer-pruned copy of the base (KVP-LP) or a smaller model (KVP-C), which of its layers are
exact (their K/V are the base's own), and LoRA deltas on its layers.

LoRA uses mlx-lm's LoRALinear: y = W x + scale * (x A) B, with B = 0 at the start (the aux is unchanged); the
wrapped weights stay the base's shared arrays, so a bundle stores only the factors.
"""

from __future__ import annotations

import copy
from typing import Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .attention import attention_of, sliding_window
from .errors import KVPredError
from .loading import LoadedModel, model_class

# Per-layer lists in configs that must be sliced when layers are dropped (openelm, llama layer_types, ...).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_transformer_layers", "n_layers", "num_layers")


# ---- building the aux ----------------------------------------------------------------------------------------

def layer_count_key(config: dict) -> str:
    for key in _LAYER_COUNT_KEYS:
        if key in config:
            return key
    raise KVPredError(f"model config has no layer count ({', '.join(_LAYER_COUNT_KEYS)})")


def pruned_config(config: dict, kept_layers: list[int]) -> dict:
    """The config of a model made of `kept_layers` of the given one: layer count and per-layer lists sliced."""
    n = config[layer_count_key(config)]
    cfg = copy.deepcopy(config)
    cfg[layer_count_key(config)] = len(kept_layers)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            cfg[key] = [value[i] for i in kept_layers]
    return cfg


def make_layer_pruned_aux(base: nn.Module, base_config: dict, kept_layers: list[int]) -> tuple[nn.Module, dict]:
    """KVP-LP aux: a model of the base's class holding the kept base layers; embeddings, final norm and
    head are the base's own arrays (shared, not copied)."""
    n = len(base.layers)
    if not kept_layers or sorted(set(kept_layers)) != list(kept_layers) or not all(0 <= i < n for i in kept_layers):
        raise KVPredError(f"aux layers must be increasing indices in 0..{n - 1}, got {kept_layers}")
    cfg = pruned_config(base_config, kept_layers)
    Model, Args = model_class(cfg)
    aux = Model(Args.from_dict(cfg))
    moved = [old for new, old in enumerate(kept_layers)
             if sliding_window(aux, aux.layers[new]) != sliding_window(base, base.layers[old])]
    if moved:  # e.g. gemma3: layer i is global when i % 6 == 5
        raise KVPredError(f"aux layers: base layers {moved} would change attention kind (sliding-window or global) "
                          f"at their aux index, as {cfg.get('model_type')} picks it by index; keep layers 0..k-1")
    layer_prefix = _layers_prefix(base)
    new_index = {old: new for new, old in enumerate(kept_layers)}
    old_index = dict(enumerate(kept_layers))

    def base_name(aux_name: str) -> str:
        """The base parameter/module name an aux one copies: layer indices mapped back."""
        if not aux_name.startswith(layer_prefix):
            return aux_name
        idx, _, rest = aux_name[len(layer_prefix):].partition(".")
        return f"{layer_prefix}{old_index[int(idx)]}" + (f".{rest}" if rest else "")

    # Quantized bases (GPU policy): give each aux module its base twin's quantization before loading arrays.
    quantized = {n: m for n, m in base.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    if quantized:
        def predicate(path, _module):
            twin = quantized.get(base_name(path))
            return {"group_size": twin.group_size, "bits": twin.bits} if twin is not None else False

        nn.quantize(aux, class_predicate=predicate)
    weights = []
    for key, value in tree_flatten(base.parameters()):
        if key.startswith(layer_prefix):
            idx, rest = key[len(layer_prefix):].split(".", 1)
            if int(idx) in new_index:
                weights.append((f"{layer_prefix}{new_index[int(idx)]}.{rest}", value))
        else:
            weights.append((key, value))
    if hasattr(aux, "sanitize"):  # as mlx-lm's load does: e.g. gemma3 ties its head when there is no lm_head weight
        weights = list(aux.sanitize(dict(weights)).items())
    aux.load_weights(weights, strict=True)
    aux.eval()
    return aux, cfg


def _layers_prefix(model: nn.Module) -> str:
    """The parameter-name prefix of the transformer blocks, e.g. 'model.layers.'."""
    first = model.layers[0]
    for name, module in model.named_modules():
        if module is first:
            return name.rsplit(".", 1)[0] + "."
    raise KVPredError("cannot locate the transformer layers in the model")


def check_same_tokenizer(base: LoadedModel, aux: LoadedModel) -> None:
    """KVP-C needs the aux to share the base's vocabulary, token for token."""
    vb = base.tokenizer.vocab_size if hasattr(base.tokenizer, "vocab_size") else None
    va = aux.tokenizer.vocab_size if hasattr(aux.tokenizer, "vocab_size") else None
    if vb != va or base.tokenizer.get_vocab() != aux.tokenizer.get_vocab():
        raise KVPredError(f"aux model {aux.source} has a different tokenizer/vocabulary than the base {base.source} "
                          f"({va} vs {vb} tokens); KV prediction needs the same tokenizer")


# ---- exact layers ----------------------------------------------------------------------------------------------

def exact_aux_layers(aux_layers: list[int], layer_map: list[int], unchanged: list[int] | None = None) -> list[int]:
    """KVP-LP: the base layers the aux runs itself, among aux layers `unchanged` (default all: a frozen aux),
    whose K/V are then the base's true ones."""
    return [i for j, i in enumerate(aux_layers) if layer_map[i] == j and (unchanged is None or j in unchanged)]


def lora_changed_exact_layers(exact_layers: Sequence[int], layer_map: Sequence[int], aux_lora: dict | None,
                              n_aux: int) -> list[int]:
    """The `exact_layers` whose aux layer (`layer_map`) `aux_lora` changes (their K/V could no longer be copied)."""
    unchanged = unchanged_kv_layers(aux_lora, n_aux)
    return [i for i in exact_layers if layer_map[i] not in unchanged]


# ---- LoRA --------------------------------------------------------------------------------------------------------

def aux_lora_config(*, rank: int, scale: float, layers: list[int]) -> dict:
    """A bundle's `aux_lora`: LoRA on aux `layers`, except the first one's K/V projections (its input is still
    the base's, so its K/V stay exact: copied, not predicted)."""
    return {"rank": rank, "scale": scale, "layers": sorted(layers), "frozen_kv": [min(layers)]}


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
