"""The training recipe as data: TrainSpec's defaults are the shipped bundle's, its checks need no model or
subprocess, build_bundle makes the aux and predictor it describes, train_recipe runs it end to end."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from conftest import tiny_model
from mlx_kvpred.bundle import load_bundle
from mlx_kvpred.data import collect_files, split_files
from mlx_kvpred.errors import KVPredError, cli_message
from mlx_kvpred.pipeline import DEFAULT_BUNDLE_DIR
from mlx_kvpred.recipe import SHIPPED_AUX_LAYERS, TrainSpec, build_bundle, train_recipe, training_data
from mlx_kvpred.train import TrainConfig


class CharTokenizer:
    """Enough of a tokenizer for tokenize_files: one id per character, inside the tiny models' vocabulary."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text]


def test_defaults_are_the_shipped_bundle():
    """The spec's defaults, resolved, are what the shipped bundle records its first stage was trained with (it was
    then fine-tuned on fact chats from the bundle that stage made, which ships too)."""
    shipped = json.loads((DEFAULT_BUNDLE_DIR / "kvp_config.json").read_text())
    base = tiny_model("llama", num_hidden_layers=len(SHIPPED_AUX_LAYERS) + 2)
    spec = TrainSpec()
    bundle, cfg = build_bundle(spec, base)
    first = shipped["training"]["init_from"]
    assert (DEFAULT_BUNDLE_DIR.parents[2] / first["bundle"] / "kvp_config.json").is_file()
    assert "--chat-data" in shipped["training"]["command"] and shipped["training"]["config"]["tail_kl_weight"] == 4
    recorded = first["config"]
    newer = set(asdict(cfg)) - set(recorded)  # options added since: their defaults are what it was trained with
    neutral = {"true_kv_head": 0, "tail_kl_weight": 1.0}
    assert newer <= set(neutral) and all(getattr(cfg, k) == neutral[k] for k in newer)
    assert {k: v for k, v in asdict(cfg).items() if k in recorded} == recorded
    assert bundle.config.aux_layers == list(SHIPPED_AUX_LAYERS) == shipped["aux_layers"]
    assert bundle.config.predictor_input == shipped["predictor_input"] == "hidden"
    assert bundle.config.prev_token_dim == shipped["prev_token_dim"]
    assert bundle.config.exact_layers == shipped["exact_layers"] and bundle.config.aux_lora is None
    assert spec.per_file == first["data"]["sequences_per_file"] == 1
    assert spec.max_train_sequences == first["data"]["train_sequences"]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(aux_layers_keep=8, init_from="b"), "exactly one aux"),
    (dict(aux_layers=[0], aux_model="m"), "exactly one aux"),
    (dict(init_from="b", layer_map=[0]), "--init-from"),
    (dict(init_from="b", train=TrainConfig(aux_lora_scale=2.0)), "--aux-lora-scale"),
    (dict(init_from="b", predictor_input="hidden"), "--predictor-input"),
    (dict(init_from="b", train=TrainConfig(aux_lora_rank=2, aux_lora_layers=[1])), "--aux-lora-layers"),
    (dict(predictor_input="keys"), "--predictor-input must be one of kv, hidden"),
    (dict(predictor_input="kv", prev_token_dim=64), "--prev-token-dim"),
    (dict(prev_token_dim=-1), "--prev-token-dim"),
    (dict(train=TrainConfig(aux_lora_layers=[7])), "--aux-lora-layers needs --aux-lora-rank"),
    (dict(aux_model="m", train=TrainConfig(aux_lora_rank=4)), "--aux-lora-rank"),
    (dict(sequences_per_file=0), "--sequences-per-file must be >= 1"),
    (dict(eval_sequences=-1), "--eval-sequences"),
])
def test_spec_checks_without_a_model(kwargs, fragment):
    with pytest.raises(KVPredError) as e:
        TrainSpec(**kwargs)
    assert fragment in cli_message(e.value) and " --" not in str(e.value)  # the CLI's flags, the API's names


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(true_kv_tail=256), "--true-kv-tail must be in 0..255"),
    (dict(seq_len=64, true_kv_tail=64), "--true-kv-tail must be in 0..63"),
    (dict(steps=0), "--steps must be >= 1"),
    (dict(seq_len=0), "--seq-len must be >= 1"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
])
def test_train_config_checks(kwargs, fragment):
    with pytest.raises(KVPredError) as e:
        TrainConfig(**kwargs)
    assert fragment in cli_message(e.value) and " --" not in str(e.value)
    assert TrainConfig(seq_len=512).true_kv_tail == 128  # default: a quarter of the sequence


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(aux_layers=[0, 4, 40]), "0..9"),
    (dict(aux_layers_keep=0), "--aux-layers-keep"),
    (dict(aux_layers_keep=8, layer_map=[0, 1, 2]), "--layer-map has 3 entries"),
    (dict(aux_layers=[0, 1, 2], prev_token_dim=1000), "exceeds the aux hidden width 64"),
    (dict(aux_layers_keep=8, train=TrainConfig(aux_lora_rank=4, aux_lora_layers=[8])), "--aux-lora-layers: aux layers"),
])
def test_checks_that_need_the_base(kwargs, fragment):
    base = tiny_model("llama", num_hidden_layers=10)
    with pytest.raises(KVPredError) as e:
        build_bundle(TrainSpec(**kwargs), base)
    assert fragment in cli_message(e.value)


def test_build_bundle_variants():
    base = tiny_model("llama", num_hidden_layers=6)
    bundle, cfg = build_bundle(TrainSpec(aux_layers_keep=3, predictor_input="kv"), base)
    assert bundle.config.aux_layers == [0, 2, 4] and bundle.config.layer_map == [0, 0, 1, 1, 2, 2]
    assert bundle.config.prev_token_dim == 0 and cfg.lr == 1e-3 and bundle.config.exact_layers == [0, 2, 4]
    lora, cfg = build_bundle(TrainSpec(aux_layers=[0, 1, 2], train=TrainConfig(aux_lora_rank=2,
                                                                              aux_lora_layers=[2])), base)
    assert lora.config.aux_lora["layers"] == [2] and lora.config.exact_layers == [0, 1, 2] and cfg.lr == 3e-4


def test_sequences_per_file_default(tmp_path):
    """One window per file on the default sources (the shipped recipe); all of each file on your own data."""
    assert TrainSpec().per_file == 1
    assert TrainSpec(data=[str(tmp_path)]).per_file is None
    assert TrainSpec(data=[str(tmp_path)], sequences_per_file=2).per_file == 2


def test_train_recipe_end_to_end(tmp_path):
    """train_recipe on a tiny model and a small text dir: a trained bundle that loads, recording its recipe;
    resuming with more steps continues the same run."""
    base = tiny_model("llama", num_hidden_layers=4)
    base.tokenizer = CharTokenizer()
    rng = np.random.default_rng(0)
    # the split hashes the absolute path, so tmp_path decides it: write files until one is held out
    i = 0
    while i < 30 or not split_files(collect_files([str(tmp_path)])).heldout_files:
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 60)))
        i += 1
    spec = TrainSpec(aux_layers=[0, 1], data=[str(tmp_path / "*.txt")], eval_sequences=0, prev_token_dim=8,
                     train=TrainConfig(steps=2, seq_len=32, ridge_sequences=4, checkpoint_every=2))
    data = training_data(spec, base.tokenizer)
    assert data.train.shape[1] == 32 and data.heldout is None and data.split.heldout_files
    notes = []
    state = train_recipe(tmp_path / "b", spec, base=base, log=notes.append)
    assert state.step == 2 and state.ridge_done and notes[0].startswith("data: ")
    bundle = load_bundle(tmp_path / "b", base)
    assert bundle.config.trained and bundle.config.aux_layers == [0, 1] and bundle.config.prev_token_dim == 8
    recorded = bundle.config.training
    assert recorded["recipe"]["aux_layers"] == [0, 1] and recorded["config"]["true_kv_tail"] == 8
    longer = TrainSpec(**{**spec.__dict__, "train": TrainConfig(**{**spec.train.__dict__, "steps": 3})})
    assert train_recipe(tmp_path / "b", longer, base=base, resume=True, log=notes.append).step == 3
    fresh = []  # --resume on a run not started yet starts it (one command starts and resumes a long run)
    assert train_recipe(tmp_path / "fresh", spec, base=base, resume=True, log=fresh.append).step == 2
    assert fresh[0].startswith("resume: no checkpoint") and load_bundle(tmp_path / "fresh", base).config.trained


def test_mixed_lengths_and_chat_records(tmp_path):
    """--long-seq-len / --chat-data: a list of sequences of several lengths, chat records whole (their last
    tokens), trained one per step."""
    import json as _json

    base = tiny_model("llama", num_hidden_layers=4)
    base.tokenizer = CharTokenizer()
    rng = np.random.default_rng(0)
    # the split hashes the absolute path, so tmp_path decides it: write files until one is held out
    i = 0
    while i < 30 or not split_files(collect_files([str(tmp_path)])).heldout_files:
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 60)))
        i += 1
    (tmp_path / "chat").mkdir()
    records = ["x" * 10, "document " * 8 + "question? answer.", "short"]
    (tmp_path / "chat" / "docchat-00000-64.jsonl").write_text("\n".join(_json.dumps({"text": t}) for t in records))
    spec = TrainSpec(aux_layers=[0, 1], data=[str(tmp_path / "*.txt")], eval_sequences=0, prev_token_dim=8,
                     long_seq_len=64, long_sequences=3, chat_data=[str(tmp_path / "chat")],
                     train=TrainConfig(steps=3, seq_len=24, true_kv_tail=6, ridge_sequences=4, checkpoint_every=3))
    data = training_data(spec, base.tokenizer)
    lengths = sorted({len(x) for x in data.train})
    assert isinstance(data.train, list) and 24 in lengths and 64 in lengths
    assert len(records[1]) in lengths and 10 in lengths and 5 not in lengths  # "short": not above the tail
    assert train_recipe(tmp_path / "b", spec, base=base, log=lambda _: None).step == 3
    with pytest.raises(KVPredError, match="batch_size 1"):
        TrainSpec(chat_data=["x"], train=TrainConfig(batch_size=2))
    with pytest.raises(KVPredError, match="go together"):
        TrainSpec(long_seq_len=512)
