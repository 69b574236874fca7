"""The KVP bundle: a directory with kvp_config.json (what it is, for which base) and model.safetensors
(predictor weights under `predictor.`, aux weights that differ from the base under `aux.`)."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import hidden_dim, kv_dims
from .atomic import atomic_write
from .auxiliary import (add_aux_lora, aux_lora_config, is_lora_param, lora_changed_exact_layers, lora_layers,
                        make_layer_pruned_aux)
from .errors import KVPredError
from .loading import LoadedModel, config_fingerprint, model_class
from .predictor import KVPredictor, PredictorConfig

FORMAT = "kvpred-mlx-bundle"
FORMAT_VERSION = 5  # 2: aux_lora; 3: predictor_input "hidden", exact_layers; 4: prev_token_dim;
# 5: aux_lora on some layers / frozen K/V projections (a bundle is written with the lowest that fits)
# Fields added after format 1, left out of the JSON at these (default) values so older readers still load it
NEWER_FIELDS = {"aux_lora": None, "predictor_input": "kv", "aux_hidden_dim": None, "exact_layers": [],
                "prev_token_dim": 0}
CONFIG_FILE = "kvp_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class BundleConfig:
    aux_kind: str  # "layer_pruned" (KVP-LP) or "separate" (KVP-C)
    layer_map: list[int]
    aux_kv_dims: list[int]
    base_kv_dims: list[int]
    base: dict  # reference, config_hash, num_layers, vocab_size, fingerprint
    aux_layers: list[int] | None = None  # KVP-LP: the base layers the aux keeps
    aux_config: dict | None = None  # KVP-C: the aux model's mlx-lm config
    aux_lora: dict | None = None  # KVP-LP: {"rank", "scale", "layers", "frozen_kv"}: LoRA on those aux layers' linears
    # but the K/V projections of the frozen_kv layers (configs without "layers": every linear of every layer)
    predictor_input: str = "kv"  # "kv" (CoreNet) or "hidden" (the aux's final normed hidden state)
    aux_hidden_dim: int | None = None  # input "hidden": its width
    exact_layers: list[int] = field(default_factory=list)  # base layers copying their aux layer's K/V
    prev_token_dim: int = 0  # input "hidden": width of the previous token's projected hidden state
    trained: bool = False
    training: dict = field(default_factory=dict)  # steps, data split, losses, command ...
    format: str = FORMAT
    format_version: int = 1


@dataclass
class Bundle:
    config: BundleConfig
    aux: nn.Module  # a full mlx-lm model (its LM head is only used by mode "aux")
    predictor: KVPredictor
    path: Path | None = None


def embedding_fingerprint(model: nn.Module, rows: int = 32) -> list[float]:
    """Norms of the first embedding rows: tells apart bases with equal shapes but different weights."""
    emb = next((m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))), None)
    if emb is None:
        return []
    vectors = emb(mx.arange(rows)).astype(mx.float32)
    return [round(x, 4) for x in mx.linalg.norm(vectors, axis=-1).tolist()]


def fingerprints_match(want: list[float], have: list[float]) -> bool:
    """Embedding fingerprints of the same weights (loaded in another dtype or quantization: 5% tolerance)."""
    return not (want and have and any(abs(a - b) > 0.05 * max(abs(a), 1e-3) for a, b in zip(want, have)))


def describe_base(base: LoadedModel) -> dict:
    return {
        "reference": Path(base.source).name if base.source.endswith(".gguf") else base.source,
        "config_hash": config_fingerprint(base.config),
        "num_layers": len(base.model.layers),
        "vocab_size": base.config.get("vocab_size"),
        "fingerprint": embedding_fingerprint(base.model),
        **({"license": base.config["license"]} if base.config.get("license") else {}),  # the GGUF's, for model cards
    }


def bundle_id(bundle: Bundle | None) -> str:
    """A short hash of a bundle's config, training record included: tells apart two trainings of one recipe."""
    if bundle is None:
        return "none"
    blob = json.dumps(asdict(bundle.config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_against_base(cfg: BundleConfig, base: LoadedModel, where: str) -> None:
    """Refuse a bundle made for another base: layer count, K/V widths, vocabulary, weights fingerprint."""
    n = len(base.model.layers)
    if cfg.base["num_layers"] != n:
        raise KVPredError(f"{where}: bundle is for a {cfg.base['num_layers']}-layer base, {base.source} has {n} layers")
    dims = kv_dims(base.model.layers)
    if list(cfg.base_kv_dims) != dims:
        raise KVPredError(f"{where}: bundle K/V widths {cfg.base_kv_dims[:3]}... do not match {base.source} {dims[:3]}...")
    vocab = base.config.get("vocab_size")
    if cfg.base.get("vocab_size") and vocab and cfg.base["vocab_size"] != vocab:
        raise KVPredError(f"{where}: bundle vocab {cfg.base['vocab_size']} does not match {base.source} vocab {vocab}")
    if not fingerprints_match(cfg.base.get("fingerprint") or [], embedding_fingerprint(base.model)):
        raise KVPredError(f"{where}: bundle was made for different weights ({cfg.base.get('reference')}) "
                          f"than {base.source} (embedding fingerprint differs)")


def save_bundle(path: str | Path, bundle: Bundle, *, base: LoadedModel | None = None,
                dtype: mx.Dtype = mx.float16) -> None:
    """Save predictor + aux weights (KVP-LP: only those differing from `base`'s arrays) in `dtype`."""
    weights = {f"predictor.{k}": v for k, v in tree_flatten(bundle.predictor.parameters())}
    aux_params = tree_flatten(bundle.aux.parameters())
    if bundle.config.aux_kind == "layer_pruned":
        if base is None:
            raise ValueError("saving a layer-pruned bundle needs the base model to diff against")
        reference = dict(tree_flatten(build_aux(bundle.config, base).parameters()))
        aux_params = [(k, v) for k, v in aux_params if k not in reference or is_lora_param(k)
                      or not mx.array_equal(reference[k], v).item()]
    weights.update({f"aux.{k}": v for k, v in aux_params})
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}

    cfg = bundle.config  # readable by older versions when it can be
    partial_lora = bool(cfg.aux_lora) and ("layers" in cfg.aux_lora or "frozen_kv" in cfg.aux_lora)
    cfg.format_version = (5 if partial_lora else 4 if cfg.prev_token_dim else 3 if cfg.predictor_input != "kv" or cfg.exact_layers
                          else 2 if cfg.aux_lora else 1)
    path = Path(path)  # weights first: a config never points at weights that are not there
    atomic_write(path / WEIGHTS_FILE, lambda tmp: mx.save_safetensors(tmp, weights, metadata={"format": "mlx"}))
    raw = {k: v for k, v in asdict(cfg).items() if k not in NEWER_FIELDS or v != NEWER_FIELDS[k]}
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(raw, indent=1)))


def read_bundle_config(path: Path) -> BundleConfig:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise KVPredError(f"not a KVP bundle: {cfg_file} is missing")
    try:
        raw = json.loads(cfg_file.read_text())
        if raw.get("format") != FORMAT:
            raise KVPredError(f"{cfg_file}: not a kvpred-mlx bundle config (format {raw.get('format')!r})")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise KVPredError(f"{cfg_file}: bundle format {raw['format_version']} is newer than this kvpred-mlx "
                              f"({FORMAT_VERSION}); upgrade kvpred-mlx")
        return BundleConfig(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise KVPredError(f"{cfg_file}: corrupt bundle config ({e})") from e


def _read_weights(path: Path) -> dict[str, mx.array]:
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise KVPredError(f"bundle weights missing: {wfile}")
    try:
        return mx.load(str(wfile))
    except Exception as e:
        raise KVPredError(f"{wfile}: corrupt or truncated weights ({str(e).splitlines()[0] if str(e) else e})") from e


def predictor_config(cfg: BundleConfig) -> PredictorConfig:
    return PredictorConfig(tuple(cfg.aux_kv_dims), tuple(cfg.base_kv_dims), tuple(cfg.layer_map),
                           input=cfg.predictor_input, aux_hidden_dim=cfg.aux_hidden_dim,
                           exact_layers=tuple(cfg.exact_layers), prev_token_dim=cfg.prev_token_dim)


def new_bundle(base: LoadedModel, aux: nn.Module, *, aux_kind: str, layer_map: list[int],
               aux_layers: list[int] | None = None, aux_config: dict | None = None,
               predictor_input: str = "kv", exact_layers: list[int] | None = None,
               prev_token_dim: int = 0) -> Bundle:
    """A bundle with a freshly initialised (untrained) predictor for `aux` -> `base`."""
    cfg = BundleConfig(aux_kind=aux_kind, layer_map=list(layer_map), aux_kv_dims=kv_dims(aux.layers),
                       base_kv_dims=kv_dims(base.model.layers), base=describe_base(base), aux_layers=aux_layers,
                       aux_config=aux_config, predictor_input=predictor_input,
                       aux_hidden_dim=hidden_dim(aux) if predictor_input == "hidden" else None,
                       exact_layers=list(exact_layers or []), prev_token_dim=prev_token_dim)
    return Bundle(cfg, aux, KVPredictor(predictor_config(cfg)))


def load_bundle(path: str | Path, base: LoadedModel, *, allow_untrained: bool = False) -> Bundle:
    """Load a bundle for `base` from a directory or a Hub repo id (`org/name`, hub.resolve_bundle); refuses a
    mismatched base, and an untrained predictor unless allowed."""
    from .hub import resolve_bundle

    path = resolve_bundle(path)
    if not path.is_dir():
        raise KVPredError(f"KVP bundle not found: {path} (a directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = read_bundle_config(path)
    check_against_base(cfg, base, str(path))
    if not cfg.trained and not allow_untrained:
        raise KVPredError(f"{path}: this predictor is untrained (closed-form/identity init only); "
                          "train it with `kvpred-mlx train` or pass allow_untrained to use it anyway",
                          "allow_untrained")
    weights = _read_weights(path)
    aux = build_aux(cfg, base)
    try:
        pcfg = predictor_config(cfg)
    except KVPredError as e:
        raise KVPredError(f"{path / CONFIG_FILE}: {e}") from e
    if list(pcfg.aux_kv_dims) != kv_dims(aux.layers):
        raise KVPredError(f"{path}: aux K/V widths in the config do not match the aux model")
    if cfg.predictor_input == "hidden" and cfg.aux_hidden_dim != hidden_dim(aux):
        raise KVPredError(f"{path}: aux_hidden_dim {cfg.aux_hidden_dim} does not match the aux model ({hidden_dim(aux)})")
    changed = lora_changed_exact_layers(cfg.exact_layers, cfg.layer_map, cfg.aux_lora, len(aux.layers))
    if cfg.exact_layers and (cfg.aux_kind != "layer_pruned" or changed):
        raise KVPredError(f"{path}: exact_layers need layer-pruned aux layers that LoRA leaves unchanged")
    predictor = KVPredictor(pcfg)
    dtype = _float_dtype(base.model)
    pred_w = [(k[len("predictor."):], v.astype(dtype)) for k, v in weights.items() if k.startswith("predictor.")]
    aux_w = [(k[len("aux."):], v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
             for k, v in weights.items() if k.startswith("aux.")]
    _load_named(predictor, pred_w, strict=True, where=f"{path / WEIGHTS_FILE} (predictor)")
    _load_named(aux, aux_w, strict=cfg.aux_kind == "separate", where=f"{path / WEIGHTS_FILE} (aux)")
    stored = {k for k, _ in aux_w}
    no_lora = [k for k, _ in tree_flatten(aux.parameters()) if is_lora_param(k) and k not in stored]
    if no_lora:
        raise KVPredError(f"{path / WEIGHTS_FILE} (aux): missing LoRA factors {no_lora[:4]}"
                          f"{'...' if len(no_lora) > 4 else ''}")
    mx.eval(predictor.parameters(), aux.parameters())
    aux.eval()
    return Bundle(cfg, aux, predictor, path)


def _float_dtype(model: nn.Module) -> mx.Dtype:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and v.ndim == 2:
            return v.dtype
    return mx.float32


def _load_named(module: nn.Module, weights: list[tuple[str, Any]], *, strict: bool, where: str) -> None:
    """load_weights with one-line errors that name the tensors: missing, unexpected, wrong shape."""
    have = dict(tree_flatten(module.parameters()))
    got = dict(weights)
    unexpected = sorted(set(got) - set(have))
    missing = sorted(set(have) - set(got)) if strict else []
    if unexpected or missing:
        parts = ([f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}"] if missing else []) + (
            [f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"] if unexpected else [])
        raise KVPredError(f"{where}: " + ", ".join(parts))
    for k, v in got.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise KVPredError(f"{where}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(have[k].shape)}")
    module.load_weights(weights, strict=False)


# ---- the aux a bundle describes ----------------------------------------------------------------------------

def build_aux(cfg: BundleConfig, base: LoadedModel) -> nn.Module:
    """The aux model of a bundle config, before its own weights are applied (KVP-LP: base layers; KVP-C: random).
    A Pipeline prepares it for its backend."""
    if cfg.aux_kind == "layer_pruned":
        aux, _ = make_layer_pruned_aux(base.model, base.config, cfg.aux_layers)
        if cfg.aux_lora:
            add_aux_lora(aux, rank=int(cfg.aux_lora["rank"]), scale=float(cfg.aux_lora["scale"]),
                         layers=lora_layers(cfg.aux_lora, len(aux.layers)),
                         frozen_kv=cfg.aux_lora.get("frozen_kv", ()))
        return aux
    if cfg.aux_kind == "separate":
        if cfg.aux_lora:
            raise KVPredError("aux_lora is only for layer-pruned aux models (a separate aux stores all its weights)")
        Model, Args = model_class(cfg.aux_config)
        return Model(Args.from_dict(cfg.aux_config))
    raise KVPredError(f"unknown aux kind {cfg.aux_kind!r} (layer_pruned or separate)")


def enable_aux_lora(bundle: "Bundle", *, rank: int, scale: float, layers: list[int] | None = None) -> None:
    """Give a KVP-LP bundle's aux trainable LoRA factors on `layers` (default all; B = 0: the aux is unchanged
    until trained)."""
    cfg = bundle.config
    if cfg.aux_kind != "layer_pruned":
        raise KVPredError("aux_lora_rank is for layer-pruned aux models (aux_layers / aux_layers_keep)",
                          "aux_lora_rank", "aux_layers", "aux_layers_keep")
    n_aux = len(bundle.aux.layers)
    lora = aux_lora_config(rank=rank, scale=scale, layers=list(range(n_aux)) if layers is None else layers)
    if lora_changed_exact_layers(cfg.exact_layers, cfg.layer_map, lora, n_aux):
        raise ValueError("exact layers copy the aux's K/V: LoRA must leave those aux layers unchanged")
    add_aux_lora(bundle.aux, rank=rank, scale=scale, layers=lora["layers"], frozen_kv=lora["frozen_kv"])
    cfg.aux_lora = lora


def shared_base_layers(bundle: "Bundle", base: nn.Module) -> int:
    """How many leading base layers the aux computes exactly: the KVP-LP aux's layers before its first LoRA layer
    (all, when frozen), when those are base layers 0..n-1 and copy their K/V, and the mlx-lm model takes
    input_embeddings (so the base can continue from the aux's residual stream); else 0. Training skips them in
    teacher and student; inference runs the exact tail through them in the aux's pass."""
    cfg = bundle.config
    n_aux = len(bundle.aux.layers)
    n = min(lora_layers(cfg.aux_lora, n_aux)) if cfg.aux_lora else n_aux
    prefix = (cfg.aux_layers or [])[:n] == list(range(n)) and all(
        i in cfg.exact_layers and cfg.layer_map[i] == i for i in range(n))
    takes_embeddings = "input_embeddings" in inspect.signature(type(base).__call__).parameters
    return n if cfg.aux_kind == "layer_pruned" and prefix and takes_embeddings else 0


SCORER_FRACTION = 0.4  # specprefill without a KVP-LP bundle: the base's first 40% of layers score the positions


def scorer_layers(bundle: "Bundle | None", base: nn.Module) -> int:
    """How many of the base's first layers score prompt positions for specprefill (importance.py): a KVP-LP
    bundle's aux (the base's layers 0..k-1, whose pass is the aux's), else SCORER_FRACTION of them."""
    if bundle is not None and shared_base_layers(bundle, base) == len(bundle.aux.layers):
        return len(bundle.aux.layers)
    return max(1, round(SCORER_FRACTION * len(base.layers)))
