"""KVP bundles on the Hugging Face Hub, shared as mlx-lm users share models: `org/name` resolves to a snapshot in the
local Hub cache (huggingface_hub downloads it, or reads the cache alone under HF_HUB_OFFLINE=1), and `upload_bundle`
pushes a bundle directory with a model card generated from its config."""

from __future__ import annotations

import re
from pathlib import Path

from .bundle import CONFIG_FILE, WEIGHTS_FILE, read_bundle_config
from .errors import KVPredError

CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Licenses whose terms travel with anything trained on the model's outputs (the card carries their notice).
NOTICES = {"gemma": "Gemma is provided under and subject to the Gemma Terms of Use found at "
                    "ai.google.dev/gemma/terms. This predictor was trained on Gemma's outputs (a Model Derivative "
                    "under those terms): its use is subject to the same terms and their use restrictions."}


def is_repo_id(ref: str) -> bool:
    """`org/name` that is not a local path (a path that exists, or starts with . / ~, is a directory reference)."""
    return bool(_REPO_ID.match(ref)) and not Path(ref).exists() and not ref.startswith((".", "/", "~"))


def resolve_bundle(ref: str | Path) -> Path:
    """The local directory of bundle `ref`: a directory as given, or a Hub repo id's snapshot (downloaded into the
    Hugging Face cache on first use; HF_HUB_OFFLINE=1 reads the cache only)."""
    if isinstance(ref, Path) or not is_repo_id(ref):
        return Path(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        path = Path(snapshot_download(repo_id=ref, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]))
    except LocalEntryNotFoundError as e:
        raise KVPredError(f"KVP bundle {ref}: no such directory, and the Hub repo is not in the local Hugging Face "
                          "cache while the Hub cannot be reached (HF_HUB_OFFLINE=1, or no network)", "kvp") from e
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise KVPredError(f"KVP bundle {ref}: no such directory, and no such Hub repo (or it is private or gated: "
                          "log in with `hf auth login`)", "kvp") from e
    except (HfHubHTTPError, OSError) as e:
        raise KVPredError(f"KVP bundle {ref}: download failed ({str(e).splitlines()[0]})", "kvp") from e
    if not (path / CONFIG_FILE).is_file():
        raise KVPredError(f"KVP bundle {ref}: the Hub repo has no {CONFIG_FILE}: not a kvpred-mlx bundle", "kvp")
    return path


def model_card(bundle_dir: str | Path, *, repo_id: str, results: str | None = None) -> str:
    """A model card for the bundle in `bundle_dir`: the base it fits (reference, config hash), the aux and predictor,
    the training command and recipe, the held-out agreement measured while training, `results` (markdown: the eval
    and bench numbers) and the base's license notice where its terms ask for one."""
    cfg = read_bundle_config(Path(bundle_dir))
    base = cfg.base
    training = cfg.training or {}
    license_id = base.get("license") or "other"
    aux = (f"the base's layers {_ranges(cfg.aux_layers)} (KVP-LP)" if cfg.aux_kind == "layer_pruned"
           else f"a separate model ({(cfg.aux_config or {}).get('model_type', '?')}, KVP-C)")
    lines = [
        "---", f"license: {license_id}", "library_name: kvpred-mlx",
        "tags:", "- kvpred-mlx", "- kv-prediction", "- mlx", "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        "A KV Prediction bundle ([arXiv 2410.08391](https://arxiv.org/abs/2410.08391)) for "
        "[kvpred-mlx](https://pypi.org/project/kvpred-mlx/): a small auxiliary model reads the prompt and learned "
        "linear maps predict the base model's KV cache from it, so the base gives its first token sooner.", "",
        "```bash", f"kvpred-mlx generate --model {base.get('reference')} --kvp {repo_id} --prompt file.txt", "```", "",
        "## Base model", "",
        f"- reference: `{base.get('reference')}`",
        f"- config hash: `{base.get('config_hash')}` ({base.get('num_layers')} layers, vocabulary "
        f"{base.get('vocab_size')}); kvpred-mlx refuses this bundle for any other base",
        "", "## Bundle", "",
        f"- aux: {aux}",
        f"- predictor input: {cfg.predictor_input}"
        + (f" (+ previous token at rank {cfg.prev_token_dim})" if cfg.prev_token_dim else ""),
        f"- exact layers (K/V copied from the aux): {_ranges(cfg.exact_layers) or 'none'}",
        f"- trained: {'yes' if cfg.trained else 'no (closed-form init only)'}",
    ]
    if training.get("command"):
        lines += ["", "## Recipe", ""]
        init = training.get("init_from") or {}
        if init.get("command"):  # a fine-tune: first the bundle it started from
            lines += ["Fine-tuned from a bundle made with:", "", "```bash", init["command"], "```", "", "then:", ""]
        lines += ["```bash", training["command"], "```"]
        if training.get("steps_done") is not None:
            lines += ["", f"{training['steps_done']} steps in {training.get('seconds', 0):.0f} s."]
    evals = training.get("evals") or []
    if evals:
        lines += ["", "Held-out top-1 agreement with the base while training (the train command's eval):", "",
                  "| step | agreement | first token | NLL kvp | NLL base |", "|---|---|---|---|---|"]
        lines += [f"| {e['step']} | {e['agreement']:.3f} | {e['first_token_agreement']:.3f} | {e['nll_kvp']:.3f} | "
                  f"{e['nll_base']:.3f} |" for e in evals]
    if results:
        lines += ["", "## Measured", "", results.strip()]
    if license_id in NOTICES:
        lines += ["", "## License", "", NOTICES[license_id]]
    return "\n".join(lines) + "\n"


def upload_bundle(bundle_dir: str | Path, repo_id: str, *, private: bool = False, results: str | None = None,
                  message: str | None = None, token: str | None = None) -> str:
    """Push the bundle in `bundle_dir` (its config, weights and a generated model card) to Hub repo `repo_id`,
    creating it if needed, in one commit. Returns the repo's URL."""
    bundle_dir = Path(bundle_dir)
    if not _REPO_ID.match(repo_id):
        raise KVPredError(f"repo id must be org/name, got {repo_id!r}", "repo_id")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (bundle_dir / f).is_file()]
    if missing:
        raise KVPredError(f"{bundle_dir}: not a KVP bundle ({', '.join(missing)} missing)", "bundle")
    card = model_card(bundle_dir, repo_id=repo_id, results=results)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations=[
            CommitOperationAdd(path_in_repo=CONFIG_FILE, path_or_fileobj=str(bundle_dir / CONFIG_FILE)),
            CommitOperationAdd(path_in_repo=WEIGHTS_FILE, path_or_fileobj=str(bundle_dir / WEIGHTS_FILE)),
            CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()),
        ], commit_message=message or f"kvpred-mlx bundle for {read_bundle_config(bundle_dir).base.get('reference')}")
    except (HfHubHTTPError, OSError, ValueError) as e:  # auth, network, permissions
        raise KVPredError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}", "repo_id") from e
    return str(url)


def _ranges(indices) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    out, run = [], []
    for i in list(indices or []) + [None]:
        if run and (i is None or i != run[-1] + 1):
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        if i is not None:
            run.append(i)
    return ", ".join(out)

