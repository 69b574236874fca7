"""Source model layouts -> mlx-lm models: CoreNet OpenELM (config inferred from the tensor shapes) and
Hugging Face transformers-style llama / qwen2 / openelm (config.json + state dict)."""

from __future__ import annotations

import math
import re
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_kvpred.errors import KVPredError
from mlx_kvpred.loading import model_class

SUPPORTED_ARCHS = ("llama", "qwen2", "openelm")

# CoreNet OpenELM sub-model names (after the `base.` / `auxiliary.` prefix) -> mlx-lm openelm names.
_CORENET_LAYER_KEYS = ("attn_norm.weight", "attn.qkv_proj.weight", "attn.q_norm.weight", "attn.k_norm.weight",
                       "attn.out_proj.weight", "ffn_norm.weight", "ffn.proj_1.weight", "ffn.proj_2.weight")
_CORENET_IGNORED = re.compile(r"(^|\.)(pos_embedding\.|rotary_emb\.)")  # non-persistent RoPE buffers, if saved


DEFAULT_ROPE_FREQ_CONSTANT = 10000.0  # CoreNet GPTConfig's default RoPE base


def mlx_make_divisible(v: float, divisor: int) -> int:
    """mlx-lm openelm's rounding of FFN widths (kept in sync with mlx_lm.models.openelm.make_divisible)."""
    from mlx_lm.models.openelm import make_divisible

    return int(make_divisible(v, divisor=divisor))


def corenet_openelm_config(sd: dict[str, mx.array], where: str, *, max_context_length: int | None = None,
                           rope_freq_constant: float = DEFAULT_ROPE_FREQ_CONSTANT) -> dict:
    """The mlx-lm `openelm` config of a CoreNet OpenELM state dict (names without the sub-model prefix),
    inferred from the tensor shapes: per-layer query/KV heads, FFN widths, tied output layer."""
    need = ["token_embeddings.weight", "norm.weight"]
    _require(sd, need, where)
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    if not layers:
        raise KVPredError(f"{where}: no transformer layers (layers.{{i}}.*) in the checkpoint")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise KVPredError(f"{where}: missing keys for layers {missing} (layers.{{i}}.*)")
    if not any(f"layers.{i}.attn.q_norm.weight" in sd for i in layers):
        raise KVPredError(f"{where}: OpenELM without q/k norms (attn.q_norm) is not supported "
                          "(the head size cannot be read from the weights)")
    _require(sd, [f"layers.{i}.{k}" for i in layers for k in _CORENET_LAYER_KEYS], where)
    vocab, dim = sd["token_embeddings.weight"].shape
    head_dim = sd["layers.0.attn.q_norm.weight"].shape[0]
    q_heads, kv_heads, ffn_dims = [], [], []
    for i in layers:
        qkv = sd[f"layers.{i}.attn.qkv_proj.weight"].shape
        out = sd[f"layers.{i}.attn.out_proj.weight"].shape
        _expect(sd, f"layers.{i}.attn.q_norm.weight", (head_dim,), where)
        _expect(sd, f"layers.{i}.attn.k_norm.weight", (head_dim,), where)
        if out[1] % head_dim or qkv[0] % head_dim or qkv[1] != dim:
            raise KVPredError(f"{where}: tensor layers.{i}.attn.qkv_proj.weight has shape {tuple(qkv)} / out_proj "
                              f"{tuple(out)}, not whole heads of size {head_dim} over model dim {dim}")
        q = out[1] // head_dim
        kv2 = qkv[0] // head_dim - q
        if kv2 <= 0 or kv2 % 2 or q % (kv2 // 2):
            raise KVPredError(f"{where}: tensor layers.{i}.attn.qkv_proj.weight has shape {tuple(qkv)}: not "
                              f"{q} query heads + equal K and V heads of size {head_dim}")
        inter = sd[f"layers.{i}.ffn.proj_2.weight"].shape[1]
        p1 = tuple(sd[f"layers.{i}.ffn.proj_1.weight"].shape)
        if p1 != (2 * inter, dim):
            raise KVPredError(f"{where}: tensor layers.{i}.ffn.proj_1.weight has shape {p1}, expected "
                              f"{(2 * inter, dim)} (a GLU FFN; non-GLU OpenELM is not supported)")
        q_heads.append(q)
        kv_heads.append(kv2 // 2)
        ffn_dims.append(inter)
    divisor = next(d for d in (256, 64, 8, 1) if all(mlx_make_divisible(f / dim * dim, d) == f for f in ffn_dims))
    tied = "classifier.weight" not in sd
    return {
        "model_type": "openelm", "architectures": ["OpenELMForCausalLM"],
        "num_transformer_layers": len(layers), "model_dim": dim, "head_dim": head_dim, "vocab_size": vocab,
        "num_query_heads": q_heads, "num_kv_heads": kv_heads,
        "ffn_multipliers": [f / dim for f in ffn_dims], "ffn_dim_divisor": divisor, "ffn_with_glu": True,
        "normalize_qk_projections": True, "share_input_output_layers": tied, "rms_norm_eps": 1e-6,
        "rope_freq_constant": rope_freq_constant, "max_context_length": max_context_length or 2048,
    }


def corenet_openelm_weights(sd: dict[str, mx.array], where: str) -> dict[str, mx.array]:
    """CoreNet OpenELM names -> mlx-lm openelm names; unknown tensors are an error (another architecture)."""
    out, unknown = {}, []
    for k, v in sd.items():
        if _CORENET_IGNORED.search(k):
            continue
        if k == "classifier.weight":
            out["lm_head.weight"] = v
        elif k in ("token_embeddings.weight", "norm.weight") or re.fullmatch(
                r"layers\.\d+\.(" + "|".join(map(re.escape, _CORENET_LAYER_KEYS)) + ")", k):
            out[f"transformer.{k}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise KVPredError(f"{where}: unexpected tensors {_few(unknown)} (not CoreNet OpenELM with RMSNorm, "
                          "GLU FFN and bias-free projections)")
    return out


def hf_model_config(config: dict, where: str) -> dict:
    """Check a transformers-style config.json is an architecture the converter supports."""
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise KVPredError(f"{where}: unknown architecture model_type={arch!r} "
                          f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    return dict(config)


def build_model(config: dict, weights: dict[str, mx.array], where: str, *,
                ignore: Iterable[str] = ()) -> nn.Module:
    """An fp32 mlx-lm model of `config` holding `weights` (mlx-lm names; sanitize() applied).
    Missing, unexpected and mis-shaped tensors are errors that name them."""
    Model, Args = model_class(config)
    try:
        model = Model(Args.from_dict(config))
    except Exception as e:  # bad config values (wrong list lengths, ...)
        raise KVPredError(f"{where}: cannot build a {config.get('model_type')} model from the config ({e})") from e
    if hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
    weights = {k: v for k, v in weights.items() if not any(re.search(p, k) for p in ignore)}
    have = dict(tree_flatten(model.parameters()))
    missing = sorted(set(have) - set(weights))
    unexpected = sorted(set(weights) - set(have))
    if missing:
        raise KVPredError(f"{where}: missing keys {_few(missing)}")
    if unexpected:
        raise KVPredError(f"{where}: unexpected keys {_few(unexpected)}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise KVPredError(f"{where}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(have[k].shape)}")
    model.load_weights([(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def _require(sd: dict, keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KVPredError(f"{where}: missing keys {_few(missing)}")


def _expect(sd: dict, key: str, shape: tuple, where: str) -> None:
    if tuple(sd[key].shape) != tuple(shape):
        raise KVPredError(f"{where}: tensor {key} has shape {tuple(sd[key].shape)}, expected {tuple(shape)}")


def _few(names: list[str], n: int = 4) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"


def relative_difference(a: mx.array, b: mx.array) -> float:
    """||a - b|| / ||b|| in fp32 (0 for two zero tensors)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    den = mx.linalg.norm(b.reshape(-1)).item()
    num = mx.linalg.norm((a - b).reshape(-1)).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
