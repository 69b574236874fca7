"""kvpred-mlx upload: push a KVP bundle to the Hugging Face Hub with a generated model card (hub.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import KVPredError
from .common import app


@app.command()
def upload(
    bundle: str = typer.Argument(..., help="The bundle directory (kvp_config.json + model.safetensors)."),
    repo_id: str = typer.Argument(..., help="Hub repo to push to, org/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repo private."),
    results: Optional[str] = typer.Option(None, help="A markdown file with the eval and bench numbers measured for "
                                                     "this bundle, put in the model card under 'Measured'."),
    message: Optional[str] = typer.Option(None, help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the model card and push nothing."),
):
    """Push a bundle to the Hugging Face Hub; users then run `--kvp org/name`. Log in first (`hf auth login`, or
    HF_TOKEN). The card names the base the bundle fits (reference and config hash), its recipe, the held-out
    agreement measured while training, --results, and the base's license notice where its terms ask for one."""
    from ..hub import model_card, upload_bundle

    text = None
    if results is not None:
        try:
            text = Path(results).read_text()
        except OSError as e:
            raise KVPredError(f"--results {results}: cannot read it ({e.strerror})") from e
    if dry_run:
        print(model_card(bundle, repo_id=repo_id, results=text), end="")
        return
    url = upload_bundle(bundle, repo_id, private=private, results=text, message=message)
    print(f"uploaded {bundle} to {url}; use it with --kvp {repo_id}", file=sys.stderr)
