"""`kvpred-mlx convert`: PyTorch / CoreNet KV-prediction checkpoints -> a KVP bundle.

Sources:
1. A CoreNet `KVPredictionLLM` state dict (.pt): `auxiliary.*` and `base.*` OpenELM sub-models, the predictor
   under `predicter.auxkv_to_basekv.{key,value}_transforms.{i}.*`; the layer map comes from the CoreNet YAML
   (`auxkv_num_layers_to_basekv_num_layers`) or --layer-map. Model configs are read off the tensor shapes.
   The checkpoint's base is checked against --model, or written as an mlx-lm model dir (--base-out).
2. A transformers-style aux model (llama / qwen2 / openelm names; config.json) as .pt/.bin/.safetensors or a
   model dir, plus a predictor state dict in CoreNet naming (with or without `predicter.auxkv_to_basekv.`).

The aux is stored as a separate (KVP-C style) model with its mlx-lm config in the bundle, whatever its origin:
a fine-tuned layer-pruned aux no longer shares weights with the base.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_kvpred.attention import kv_dims
from mlx_kvpred.atomic import atomic_write
from mlx_kvpred.bundle import load_bundle, new_bundle, save_bundle
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.loading import LoadedModel, load_model, quiet_transformers

from .checkpoint import read_state_dict
from .models import (DEFAULT_ROPE_FREQ_CONSTANT, build_model, corenet_openelm_config, corenet_openelm_weights,
                     hf_model_config, relative_difference, _few)

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
PREDICTOR_PREFIXES = ("predicter.auxkv_to_basekv.", "auxkv_to_basekv.", "predicter.", "predictor.")
_PREDICTOR_KEY = re.compile(r"(key|value)_transforms\.(\d+)\.(weight|bias)")
LAYER_MAP_KEY = "auxkv_num_layers_to_basekv_num_layers"
BASE_TOLERANCE = 0.02  # relative L2 difference allowed between the checkpoint's base and --model (bf16 vs fp16)
BASE_TOLERANCE_QUANTIZED = 0.25  # --model is quantized (GGUF / mlx-lm quantized): only a wrong model exceeds this




@dataclass
class CoreNetConfig:
    """What a converter needs from a CoreNet YAML: the layer map, RoPE base, context and (for the record) model names."""

    path: str
    layer_map: list[int] | None = None
    base_name: str | None = None
    aux_name: str | None = None
    max_context_length: int | None = None
    rope_freq_constant: dict[str, float] = field(default_factory=dict)  # RoPE base per role: "base", "auxiliary"


@dataclass
class ConvertResult:
    out: Path
    source_format: str  # "corenet" or "pytorch"
    aux_config: dict
    base_source: str
    layer_map: list[int]
    notes: list[str] = field(default_factory=list)


def convert(source: str | Path, out: str | Path, *, model: str | None = None, base_out: str | Path | None = None,
            tokenizer: str | None = None, config: str | Path | None = None, predictor: str | Path | None = None,
            aux_config: str | Path | None = None, layer_map: list[int] | None = None,
            dtype: str = "fp16", command: str | None = None) -> ConvertResult:
    """Convert `source` into a KVP bundle at `out` (see the module docstring); returns what was done."""
    if dtype not in DTYPES:
        raise KVPredError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise KVPredError(f"--out {out} exists and is not a directory")
    yaml_cfg = read_corenet_yaml(config) if config is not None else None
    notes: list[str] = []
    sd = read_state_dict(source)

    if is_corenet(sd):
        if predictor is not None or aux_config is not None:
            raise KVPredError(f"{source} is a CoreNet KVPredictionLLM checkpoint (aux, base and predictor in one "
                              "file): --predictor and --aux-config are for plain aux state dicts")
        fmt = "corenet"
        parts = split_corenet(sd, str(source))
        ctx = yaml_cfg.max_context_length if yaml_cfg else None
        rope = yaml_cfg.rope_freq_constant if yaml_cfg else {}
        where_aux = f"{source} (auxiliary)"
        aux_cfg = corenet_openelm_config(parts["auxiliary"], where_aux, max_context_length=ctx,
                                         rope_freq_constant=rope.get("auxiliary", DEFAULT_ROPE_FREQ_CONSTANT))
        aux_w = corenet_openelm_weights(parts["auxiliary"], where_aux)
        pred_sd, pred_where = parts["predicter"], f"{source} (predicter)"
        ckpt_base = None
        if parts["base"]:
            where_base = f"{source} (base)"
            ckpt_base = (corenet_openelm_config(parts["base"], where_base, max_context_length=ctx,
                                                rope_freq_constant=rope.get("base", DEFAULT_ROPE_FREQ_CONSTANT)),
                         corenet_openelm_weights(parts["base"], where_base))
    else:
        fmt = "pytorch"
        if predictor is None:
            raise KVPredError(f"{source} has no predicter.* / auxiliary.* tensors, so it is not a CoreNet "
                              "KVPredictionLLM checkpoint; for a plain aux state dict pass --predictor FILE")
        if base_out is not None:
            raise KVPredError("--base-out writes the base of a CoreNet checkpoint; a plain aux state dict has none "
                              "(pass the base with --model)")
        where_aux = str(source)
        aux_cfg = hf_model_config(read_json_config(aux_config, source), where_aux)
        aux_w = sd
        if aux_cfg["model_type"] == "openelm" and "token_embeddings.weight" in sd:  # CoreNet names, no prefix
            aux_w = corenet_openelm_weights(sd, where_aux)
        pred_sd, pred_where = read_state_dict(predictor), str(predictor)
        ckpt_base = None

    pred = parse_predictor(pred_sd, pred_where)
    aux = build_model(aux_cfg, aux_w, where_aux)
    base, finish_base = resolve_base(model, base_out, ckpt_base, tokenizer=tokenizer, dtype=dtype, notes=notes,
                                     source=source)

    lmap, map_from = layer_map, "--layer-map"
    if lmap is None and yaml_cfg is not None:
        lmap, map_from = yaml_cfg.layer_map, str(yaml_cfg.path)
    if lmap is None:
        raise KVPredError(f"no layer map: pass --config (the CoreNet YAML with {LAYER_MAP_KEY}) "
                          "or --layer-map (aux layer for each base layer, comma-separated)")
    if yaml_cfg is not None and layer_map is not None and yaml_cfg.layer_map not in (None, layer_map):
        notes.append(f"--layer-map overrides the layer map of {yaml_cfg.path}")

    n_base, n_aux = len(base.model.layers), len(aux.layers)
    if len(lmap) != n_base:
        raise KVPredError(f"layer map ({map_from}) has {len(lmap)} entries, the base has {n_base} layers")
    bad = [j for j in lmap if not 0 <= j < n_aux]
    if bad:
        raise KVPredError(f"layer map ({map_from}) reads aux layers {sorted(set(bad))}, the aux has {n_aux} layers "
                          f"(0..{n_aux - 1})")
    if pred.n_layers != n_base:
        raise KVPredError(f"{pred_where}: the predictor has {pred.n_layers} base layers (key_transforms.0.."
                          f"{pred.n_layers - 1}), the base has {n_base} layers")
    aux_vocab, base_vocab = _vocab(aux_cfg), _vocab(base.config)
    if aux_vocab and base_vocab and aux_vocab < base_vocab:
        raise KVPredError(f"the aux vocabulary ({aux_vocab}) is smaller than the base's ({base_vocab}); "
                          "KV prediction needs the base's tokenizer")

    pred_weights = predictor_weights(pred, pred_where, aux_dims=kv_dims(aux.layers),
                                     base_dims=kv_dims(base.model.layers), layer_map=lmap)

    base = finish_base()  # --base-out is written only now that everything fits
    bundle = new_bundle(base, aux, aux_kind="separate", layer_map=list(lmap), aux_config=aux_cfg)
    bundle.predictor.load_weights(pred_weights, strict=True)
    mx.eval(bundle.predictor.parameters())
    bundle.config.trained = True
    bundle.config.training = {
        "source": "converted", "format": fmt, "checkpoint": str(source.resolve()),
        "checkpoint_bytes": _size(source), "predictor": str(Path(predictor).resolve()) if predictor else None,
        "corenet_config": str(Path(config).resolve()) if config else None, "layer_map_from": map_from,
        "base_model_name": yaml_cfg.base_name if yaml_cfg else None,
        "aux_model_name": yaml_cfg.aux_name if yaml_cfg else None, "dtype": dtype,
        "command": command or " ".join(["kvpred-mlx"] + sys.argv[1:]),
    }
    save_bundle(out, bundle, base=base, dtype=DTYPES[dtype])
    load_bundle(out, base)  # what `generate --kvp` will do: fails loudly here rather than there
    return ConvertResult(out, fmt, aux_cfg, base.source, list(lmap), notes)


def is_corenet(sd: dict) -> bool:
    return any(k.startswith(("predicter.", "auxiliary.")) for k in sd)


def split_corenet(sd: dict[str, mx.array], where: str) -> dict[str, dict[str, mx.array]]:
    """`auxiliary.*`, `base.*`, `predicter.*` of a KVPredictionLLM state dict (prefixes stripped, except predicter)."""
    parts: dict[str, dict[str, mx.array]] = {"auxiliary": {}, "base": {}, "predicter": {}}
    other = []
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in ("auxiliary", "base"):
            parts[head][rest] = v
        elif head == "predicter":
            parts["predicter"][k] = v
        else:
            other.append(k)
    if other:
        raise KVPredError(f"{where}: unexpected keys {_few(sorted(other))} (a KVPredictionLLM state dict has only "
                          "auxiliary.*, base.* and predicter.*)")
    if not parts["auxiliary"]:
        raise KVPredError(f"{where}: missing keys auxiliary.* (the aux model)")
    if not parts["predicter"]:
        raise KVPredError(f"{where}: missing keys predicter.auxkv_to_basekv.* (the predictor)")
    return parts


@dataclass
class PredictorWeights:
    tensors: dict[tuple[str, int, str], mx.array]  # (key|value, base layer, weight|bias) -> array
    names: dict[tuple[str, int, str], str]  # the same -> name in the source file
    n_layers: int


def parse_predictor(sd: dict[str, mx.array], where: str) -> PredictorWeights:
    """A CoreNet-named predictor, with or without its `predicter.auxkv_to_basekv.` prefix."""
    tensors, names, unexpected = {}, {}, []
    for k, v in sd.items():
        name = k
        for prefix in PREDICTOR_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        m = _PREDICTOR_KEY.fullmatch(name)
        if m is None:
            unexpected.append(k)
            continue
        key = (m.group(1), int(m.group(2)), m.group(3))
        tensors[key], names[key] = v, k
    if unexpected:
        raise KVPredError(f"{where}: unexpected keys {_few(sorted(unexpected))} (a predictor has "
                          "[predicter.auxkv_to_basekv.]{key,value}_transforms.{i}.{weight,bias})")
    if not tensors:
        raise KVPredError(f"{where}: no predictor tensors ({{key,value}}_transforms.{{i}}.{{weight,bias}})")
    n = max(i for _, i, _ in tensors) + 1
    prefix = next((names[k][: -len(f"{k[0]}_transforms.{k[1]}.{k[2]}")] for k in names), "")
    missing = [f"{prefix}{kind}_transforms.{i}.{p}" for i in range(n) for kind in ("key", "value")
               for p in ("weight", "bias") if (kind, i, p) not in tensors]
    if missing:
        raise KVPredError(f"{where}: missing keys {_few(missing)}")
    return PredictorWeights(tensors, names, n)


def predictor_weights(pred: PredictorWeights, where: str, *, aux_dims: list[int], base_dims: list[int],
                      layer_map: list[int]) -> list[tuple[str, mx.array]]:
    """KVPredictor weights (fp32); a shape that does not fit names the tensor and both shapes."""
    weights = []
    for (kind, i, p), v in sorted(pred.tensors.items()):
        want = (base_dims[i], aux_dims[layer_map[i]]) if p == "weight" else (base_dims[i],)
        if tuple(v.shape) != want:
            raise KVPredError(
                f"{where}: tensor {pred.names[(kind, i, p)]} has shape {tuple(v.shape)}, expected {want} "
                f"(base layer {i} {kind} width {base_dims[i]} <- aux layer {layer_map[i]} width "
                f"{aux_dims[layer_map[i]]}): the layer map or the models do not fit this predictor")
        weights.append((f"{kind}_transforms.{i}.{p}", v.astype(mx.float32)))
    return weights


def resolve_base(model: str | None, base_out, ckpt_base, *, tokenizer: str | None, dtype: str, notes: list[str],
                 source: Path):
    """The base the bundle is made for: --model (checked against the checkpoint's base, if it has one), or the
    checkpoint's base as an mlx-lm model dir (--base-out). Returns (base, finish): `finish()` writes --base-out
    (once every other check has passed) and returns the base as `generate --model` will load it."""
    if base_out is not None:
        if ckpt_base is None:
            raise KVPredError(f"--base-out: {source} has no base.* tensors to write")
        base_out = Path(base_out)
        if base_out.exists() and not base_out.is_dir():
            raise KVPredError(f"--base-out {base_out} exists and is not a directory")
        cfg, weights = ckpt_base
        built = build_model(cfg, weights, f"{source} (base)")
        if model is not None:
            with quiet_transformers():
                ref = load_model(model, device="cpu")
            notes.append(verify_base(ref, cfg, built, source))
        tok_src = tokenizer or (model if model is not None and not str(model).endswith(".gguf") else None)
        tok = load_tokenizer(tok_src) if tok_src is not None else None
        in_memory = LoadedModel(built, None, cfg, str(base_out))

        def finish() -> LoadedModel:
            write_model_dir(base_out, built, cfg, DTYPES[dtype], tok)
            if tok is None:
                notes.append(f"base: wrote {base_out} WITHOUT a tokenizer: add its tokenizer files (--tokenizer "
                             "DIR|REPO) before running generate")
                return in_memory
            notes.append(f"base: wrote {base_out} (mlx-lm model dir; tokenizer from {tok_src})")
            with quiet_transformers():  # transformers does not know model_type openelm and says so
                return load_model(str(base_out), device="cpu")

        return in_memory, finish
    if model is None:
        hint = " or --base-out DIR (write the checkpoint's base as an mlx-lm model)" if ckpt_base else ""
        raise KVPredError(f"give the base model with --model (mlx-lm dir, .gguf or HF repo id){hint}")
    if tokenizer is not None:
        raise KVPredError("--tokenizer is only used with --base-out")
    with quiet_transformers():
        base = load_model(model, device="cpu")
    if ckpt_base is not None:
        cfg, weights = ckpt_base
        notes.append(verify_base(base, cfg, build_model(cfg, weights, f"{source} (base)"), source))
    return base, lambda: base


def load_tokenizer(source: str):
    try:
        from transformers import AutoTokenizer

        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # transformers' messages run over several lines: keep all of them, on one
        why = " ".join(str(e).split())[:400] or type(e).__name__
        raise KVPredError(f"--tokenizer {source}: cannot load a tokenizer ({why})") from e


def verify_base(base: LoadedModel, cfg: dict, ckpt_model, source: Path) -> str:
    """Refuse a --model that is not the checkpoint's base: architecture, layer count, shapes, then weights."""
    if base.config.get("model_type") != cfg["model_type"]:
        raise KVPredError(f"--model {base.source} is a {base.config.get('model_type')} model; the base in {source} "
                          f"is {cfg['model_type']}")
    n_ref, n_ck = len(base.model.layers), len(ckpt_model.layers)
    if n_ref != n_ck:
        raise KVPredError(f"--model {base.source} has {n_ref} layers; the base in {source} has {n_ck}")
    ref = dict(tree_flatten(base.model.parameters()))
    quantized = str(base.source).endswith(".gguf") or "quantization" in base.config
    tol = BASE_TOLERANCE_QUANTIZED if quantized else BASE_TOLERANCE
    worst, worst_name = 0.0, ""
    for name, v in tree_flatten(ckpt_model.parameters()):
        if name not in ref:
            raise KVPredError(f"--model {base.source} has no tensor {name}, which the base in {source} has")
        r = ref[name]
        if name.endswith("token_embeddings.weight") and r.shape[1:] == v.shape[1:]:
            rows = min(r.shape[0], v.shape[0])  # CoreNet pads the vocabulary (32128 vs 32000)
            r, v = r[:rows], v[:rows]
        if tuple(r.shape) != tuple(v.shape):
            raise KVPredError(f"--model {base.source}: tensor {name} has shape {tuple(r.shape)}, the base in "
                              f"{source} has {tuple(v.shape)}")
        d = relative_difference(v, r)
        if d > worst:
            worst, worst_name = d, name
        if d > tol:
            raise KVPredError(f"--model {base.source} is not the base in {source}: tensor {name} differs "
                              f"(relative difference {d:.3g} > {tol})")
    return f"base check: {source} base matches --model {base.source} (max relative difference {worst:.2g}" + (
        f" at {worst_name})" if worst_name else ")")


def write_model_dir(path: Path, model, config: dict, dtype: mx.Dtype, tokenizer=None) -> None:
    """An mlx-lm model dir: config.json, model.safetensors (in `dtype`) and, if given, the tokenizer."""
    from mlx_lm.utils import save_config

    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    atomic_write(path / "model.safetensors", lambda tmp: mx.save_safetensors(tmp, weights, metadata={"format": "mlx"}))
    atomic_write(path / "config.json", lambda tmp: save_config(dict(config), tmp))


def read_json_config(aux_config, source: Path) -> dict:
    """The aux's config.json: --aux-config, else config.json in the source dir or next to the source file."""
    if aux_config is not None:
        path = Path(aux_config)
    else:
        path = (source if source.is_dir() else source.parent) / "config.json"
        if not path.is_file():
            raise KVPredError(f"no config.json for the aux model {source}: pass --aux-config FILE")
    if not path.is_file():
        raise KVPredError(f"--aux-config: file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KVPredError(f"{path}: not a JSON model config ({e})") from e
    if not isinstance(cfg, dict):
        raise KVPredError(f"{path}: not a JSON model config (expected an object)")
    return cfg


def read_corenet_yaml(path) -> CoreNetConfig:
    """Layer map, model names and context length from a CoreNet YAML (nested or flattened dotted keys)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise KVPredError(f"--config: file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise KVPredError(f"{path}: not a readable YAML file ({str(e).splitlines()[0] if str(e) else e})") from e
    if not isinstance(doc, dict):
        raise KVPredError(f"{path}: not a CoreNet config (expected a YAML mapping)")
    raw = _find(doc, LAYER_MAP_KEY)
    if raw is None:
        raise KVPredError(f"{path}: no {LAYER_MAP_KEY} (model.language_modeling.kv_prediction) in this config")
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError:
            pass
    if not isinstance(raw, list) or not raw or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raise KVPredError(f"{path}: {LAYER_MAP_KEY} must be a list of integers, got {raw!r}"[:300])
    kvp = _find(doc, "kv_prediction")
    names, rope = {}, {}
    for role in ("base_model", "auxiliary_model"):
        node = kvp.get(role) if isinstance(kvp, dict) else _find(doc, role)
        names[role] = _find(node, "model_name") if node is not None else None
        # RoPE base: the sub-model's own setting, else one for the whole config, else CoreNet's default
        value = (_find(node, "rope_freq_constant") if node is not None else None) or _find(doc, "rope_freq_constant")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise KVPredError(f"{path}: rope_freq_constant must be a positive number, got {value!r}"[:300])
            rope[role.removesuffix("_model")] = float(value)
    ctx = _find(doc, "max_context_length")
    return CoreNetConfig(str(path), list(raw), names["base_model"], names["auxiliary_model"],
                         ctx if isinstance(ctx, int) else None, rope)


def _find(node: Any, key: str) -> Any:
    """First value of `key` in a nested YAML document (also `a.b.key` and `a.b.key-with-hyphens` forms)."""
    alt = key.replace("_", "-")
    if isinstance(node, dict):
        for k, v in node.items():
            last = str(k).rsplit(".", 1)[-1]
            if last in (key, alt):
                return v
        for v in node.values():
            found = _find(v, key)
            if found is not None:
                return found
    elif isinstance(node, list):
        for v in node:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _vocab(config: dict) -> int | None:
    v = config.get("vocab_size")
    return v if isinstance(v, int) else None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
