"""The training recipe as data. `TrainSpec`'s defaults are the shipped bundle's first stage, so
`train_recipe("runs/lp12")` reproduces it (the shipped bundle is that one fine-tuned on fact chats: `init_from` and
`chat_data`, docs/training.md); `kvpred-mlx train` maps its flags onto a TrainSpec.

- `TrainSpec`: which aux (base layers, a smaller model, or a bundle to fine-tune), what the predictor reads,
  the training text, and the optimisation (`TrainConfig`). Constructing one checks every option that does not
  need the base model.
- `build_bundle`: the spec + a base -> the aux, layer map, exact layers, LoRA and an untrained predictor.
- `training_data`: the by-file train / held-out split of the spec's text, tokenized.
- `train_recipe`: all of it, then `train.train`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .auxiliary import (aux_lora_config, check_same_tokenizer, exact_aux_layers, lora_layers, make_layer_pruned_aux,
                        unchanged_kv_layers)
from .bundle import Bundle, enable_aux_lora, load_bundle, new_bundle
from .data import TextSplit, collect_files, default_sources, split_files, tokenize_files, tokenize_records
from .errors import KVPredError
from .loading import LoadedModel, current_device, default_device, load_model, set_device
from .predictor import check_predictor_input, layer_pruned_map, smaller_model_map, spread_layers
from .train import CHECKPOINT_DIR, DEFAULT_LR, TrainConfig, TrainState, train

SHIPPED_AUX_LAYERS = tuple(range(12))  # KVP-LP with the base's first 12 of 30 layers (why 12: docs/training.md)
DEFAULT_PREV_TOKEN_DIM = 64  # with predictor input "hidden" (docs/training.md)
EVAL_SEQ_LEN = 320  # held-out sequences of the training run's evals: 256 prompt + 64 scored tokens
MAX_RECORD_TOKENS = 2304  # --chat-data records longer than this keep their last tokens (question and answer)


@dataclass
class TrainSpec:
    """What to train. Every default is the shipped bundle's first stage; None fields are resolved as their comments
    say."""

    # The aux: at most one of these; none given means the base layers SHIPPED_AUX_LAYERS (KVP-LP)
    aux_layers: list[int] | None = None  # KVP-LP: the base layers the aux keeps
    aux_layers_keep: int | None = None  # KVP-LP: this many evenly spread base layers
    aux_model: str | None = None  # KVP-C: a smaller model with the same tokenizer
    init_from: str | None = None  # fine-tune this bundle (its aux, layer map, predictor input and LoRA)
    layer_map: list[int] | None = None  # aux layer read by each base layer; None: CoreNet's map for the aux kind
    predictor_input: str | None = None  # "hidden" (None) or "kv" (CoreNet's)
    prev_token_dim: int | None = None  # input "hidden": previous-token rank; None: DEFAULT_PREV_TOKEN_DIM
    # Training text, split into train / held-out by file
    data: list[str] | None = None  # files, dirs, globs; None: data.default_sources()
    max_train_sequences: int = 4000
    sequences_per_file: int | None = None  # None: 1 on the default sources (the shipped recipe), all on `data`
    long_seq_len: int | None = None  # mixed lengths: also windows of this many tokens of the same text ...
    long_sequences: int = 0  # ... this many of them (one per file)
    chat_data: list[str] | None = None  # .jsonl shards whose records train whole (chat-data --documents)
    eval_sequences: int = 8  # held-out sequences per eval during training (0: none)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        given = [self.aux_layers is not None, self.aux_layers_keep is not None, self.aux_model is not None,
                 self.init_from is not None]
        if sum(given) > 1:
            raise KVPredError("give exactly one aux (none: base layers 0-11): aux_layers LIST, aux_layers_keep N, "
                              "aux_model PATH or init_from BUNDLE", "aux_layers", "aux_layers_keep", "aux_model",
                              "init_from")
        t = self.train
        if self.init_from is not None and (self.layer_map is not None or t.aux_lora_rank or t.aux_lora_layers
                                           is not None or t.aux_lora_scale != TrainConfig.aux_lora_scale
                                           or self.predictor_input is not None or self.prev_token_dim is not None):
            raise KVPredError("init_from: the bundle fixes the layer map, predictor input and LoRA; drop layer_map, "
                              "predictor_input, prev_token_dim, aux_lora_rank, aux_lora_scale, aux_lora_layers",
                              "init_from", "layer_map", "predictor_input", "prev_token_dim", "aux_lora_rank",
                              "aux_lora_scale", "aux_lora_layers")
        if self.init_from is None:
            check_predictor_input(self.input, self.prev_dim, input_name="predictor_input", dim_name="prev_token_dim")
        if t.aux_lora_rank and self.aux_model is not None:
            raise KVPredError("aux_lora_rank is for layer-pruned aux models only (not aux_model)", "aux_lora_rank",
                              "aux_model")
        if t.aux_lora_layers is not None and not t.aux_lora_rank:
            raise KVPredError("aux_lora_layers needs aux_lora_rank", "aux_lora_layers", "aux_lora_rank")
        for name, value in (("sequences_per_file", self.sequences_per_file),
                            ("max_train_sequences", self.max_train_sequences)):
            if value is not None and value < 1:
                raise KVPredError(f"{name} must be >= 1, got {value}", name)
        if self.eval_sequences < 0:
            raise KVPredError(f"eval_sequences must be >= 0, got {self.eval_sequences}", "eval_sequences")
        if (self.long_seq_len is None) != (self.long_sequences == 0) or (self.long_seq_len or 2) < 2:
            raise KVPredError("long_seq_len N (>= 2) and long_sequences M (>= 1) go together", "long_seq_len",
                              "long_sequences")
        if self.mixed and t.batch_size != 1:
            raise KVPredError("long_seq_len and chat_data train sequences of mixed lengths: batch_size 1", "long_seq_len",
                              "chat_data", "batch_size")

    @property
    def mixed(self) -> bool:
        """Whether the training set holds sequences of several lengths (a list, one sequence per step)."""
        return bool(self.long_sequences or self.chat_data)

    @property
    def input(self) -> str:
        return self.predictor_input or "hidden"

    @property
    def prev_dim(self) -> int:
        if self.prev_token_dim is not None:
            return self.prev_token_dim
        return DEFAULT_PREV_TOKEN_DIM if self.input == "hidden" else 0

    @property
    def sources(self) -> list[str]:
        return list(self.data) if self.data else default_sources()

    @property
    def per_file(self) -> int | None:
        if self.sequences_per_file is not None:
            return self.sequences_per_file
        return None if self.data else 1  # own text (e.g. chat-data's 16-conversation shards): all of each file


def build_bundle(spec: TrainSpec, base: LoadedModel) -> tuple[Bundle, TrainConfig]:
    """The spec's aux, layer map, exact layers, LoRA and untrained predictor for `base`, and its TrainConfig with
    every None resolved (the lr of the predictor input; for --init-from the bundle's LoRA and no ridge init)."""
    cfg = spec.train
    if spec.init_from is not None:
        bundle = load_bundle(spec.init_from, base)
        lora = bundle.config.aux_lora or {}
        cfg = replace(cfg, ridge_sequences=0,  # the bundle's predictor is the starting point
                      aux_lora_rank=lora.get("rank", 0), aux_lora_scale=lora.get("scale", cfg.aux_lora_scale),
                      aux_lora_layers=lora_layers(lora, len(bundle.aux.layers)) if lora else None)
    else:
        bundle = _new_bundle(spec, base)
    if cfg.lr is None:
        cfg = replace(cfg, lr=DEFAULT_LR[bundle.config.predictor_input])
    return bundle, cfg


def _new_bundle(spec: TrainSpec, base: LoadedModel) -> Bundle:
    n_base = len(base.model.layers)
    if spec.aux_model is not None:
        aux_loaded = load_model(spec.aux_model, device=current_device())
        check_same_tokenizer(base, aux_loaded)
        aux, kept, aux_kind, aux_config = aux_loaded.model, None, "separate", aux_loaded.config
        default_map = smaller_model_map(len(aux.layers), n_base)
    else:
        if spec.aux_layers_keep is not None and not 1 <= spec.aux_layers_keep <= n_base:
            raise KVPredError(f"aux_layers_keep must be in 1..{n_base}, got {spec.aux_layers_keep}", "aux_layers_keep")
        kept = (spread_layers(n_base, spec.aux_layers_keep) if spec.aux_layers_keep is not None
                else list(spec.aux_layers or SHIPPED_AUX_LAYERS))
        if not all(0 <= i < n_base for i in kept):
            raise KVPredError(f"aux_layers: layers must be in 0..{n_base - 1}, got {kept}", "aux_layers")
        aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
        aux_kind, aux_config = "layer_pruned", None
        default_map = layer_pruned_map(kept, n_base)
    lmap = list(spec.layer_map) if spec.layer_map is not None else default_map
    if len(lmap) != n_base:
        raise KVPredError(f"layer_map has {len(lmap)} entries, the base has {n_base} layers", "layer_map")
    t = spec.train
    n_aux = len(aux.layers)
    if t.aux_lora_layers is not None and not all(0 <= j < n_aux for j in t.aux_lora_layers):
        raise KVPredError(f"aux_lora_layers: aux layers must be in 0..{n_aux - 1}, got {t.aux_lora_layers}",
                          "aux_lora_layers")
    lora = aux_lora_config(rank=t.aux_lora_rank, scale=t.aux_lora_scale, layers=t.aux_lora_layers or list(
        range(n_aux))) if t.aux_lora_rank else None
    # KVP-LP: the kept layers the aux still computes as the base does (frozen, or before LoRA): copied K/V
    exact = exact_aux_layers(kept, lmap, unchanged_kv_layers(lora, n_aux)) if kept else []
    bundle = new_bundle(base, aux, aux_kind=aux_kind, layer_map=lmap, aux_layers=kept, aux_config=aux_config,
                        predictor_input=spec.input, exact_layers=exact, prev_token_dim=spec.prev_dim)
    if lora:
        enable_aux_lora(bundle, rank=t.aux_lora_rank, scale=t.aux_lora_scale, layers=lora["layers"])
    return bundle


@dataclass
class TrainingData:
    train: np.ndarray | list[np.ndarray]  # (n, seq_len) token ids; mixed lengths: a list of 1-D sequences
    heldout: np.ndarray | None  # (m, EVAL_SEQ_LEN), one per held-out file; None without evals
    split: TextSplit
    sources: list[str]


def training_data(spec: TrainSpec, tokenizer) -> TrainingData:
    sources = spec.sources
    split = split_files(collect_files(sources))
    seed = spec.train.seed
    train_seqs = tokenize_files(split.train_files, tokenizer, seq_len=spec.train.seq_len,
                                max_sequences=spec.max_train_sequences, per_file=spec.per_file, seed=seed)
    heldout = tokenize_files(split.heldout_files, tokenizer, seq_len=EVAL_SEQ_LEN, max_sequences=spec.eval_sequences,
                             per_file=1, seed=seed) if split.heldout_files and spec.eval_sequences else None
    if spec.mixed:
        train_seqs = list(train_seqs)
        if spec.long_sequences:
            train_seqs += list(tokenize_files(split.train_files, tokenizer, seq_len=spec.long_seq_len,
                                              max_sequences=spec.long_sequences, per_file=1, seed=seed + 1))
        if spec.chat_data:  # chat-data --documents draws its documents from the training split
            t = spec.train
            train_seqs += tokenize_records(collect_files(spec.chat_data), tokenizer,
                                           min_len=t.true_kv_tail + t.true_kv_head + 1, max_len=MAX_RECORD_TOKENS)
    return TrainingData(train_seqs, heldout, split, sources)


def train_recipe(out: str | Path, spec: TrainSpec | None = None, *, model: str | Path | None = None,
                 base: LoadedModel | None = None, resume: bool = False, command: str | None = None,
                 on_step: Callable[[TrainState, dict], None] | None = None,
                 log: Callable[[str], None] | None = None, device: str | None = None) -> TrainState:
    """Train the bundle `spec` describes (default: the shipped recipe) for `base` (or `model`, loaded on `device`,
    None: the GPU where MLX has one; model None: the default model) into `out`. `resume` continues from
    out/checkpoint where one exists (else it starts fresh, so one command both starts a run and resumes it);
    `log` gets one-line notes."""
    spec = spec or TrainSpec()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if resume and not (Path(out) / CHECKPOINT_DIR / "state.json").is_file():
        log(f"resume: no checkpoint in {Path(out) / CHECKPOINT_DIR} yet; starting a fresh run")
        resume = False
    if base is None:
        device = set_device(device or default_device())
        base = load_model(model, device=device)
    bundle, cfg = build_bundle(spec, base)
    data = training_data(spec, base.tokenizer)
    if spec.mixed:
        lengths = [len(x) for x in data.train]
        shape = f"{len(lengths)} sequences of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f})"
    else:
        shape = f"{len(data.train)} x {cfg.seq_len} tokens"
    log(f"data: {len(data.split.train_files)} train files -> {shape}; {len(data.split.heldout_files)} held-out files")

    def evaluate(b: Bundle) -> dict:
        from .evaluate import evaluate_heldout
        from .pipeline import Pipeline

        if data.heldout is None:
            return {}
        m = evaluate_heldout(Pipeline(base, b), data.heldout, with_aux=False)
        return {"agreement": m.agreement, "first_token_agreement": m.first_token_agreement,
                "nll_base": m.nll_base, "nll_kvp": m.nll_kvp}

    metadata = {"command": command, "recipe": asdict(spec), "data": {
        "sources": data.sources, "rule": data.split.rule, "train_files": len(data.split.train_files),
        "heldout_files": data.split.heldout_files[:500], "train_sequences": int(len(data.train)),
        "seq_len": cfg.seq_len, "sequences_per_file": spec.per_file, "long_seq_len": spec.long_seq_len,
        "long_sequences": spec.long_sequences, "chat_data": spec.chat_data}}
    if spec.init_from is not None:
        metadata["init_from"] = {"bundle": str(spec.init_from), "command": bundle.config.training.get("command"),
                                 "config": bundle.config.training.get("config"),
                                 "data": bundle.config.training.get("data")}
    return train(base, bundle, data.train, cfg, out, resume=resume, evaluate=evaluate, metadata=metadata,
                 on_step=on_step)
