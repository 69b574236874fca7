"""The `kvpred-mlx` command line: one module per command (flags and printing); the work is in the library and
bench/. Library errors name options in the Python API's words; `main` shows them as this CLI's flags."""

from __future__ import annotations

import sys

from ..errors import KVPredError, cli_message
from .common import app

# Each module adds its command(s) to `app`; imported in the order `--help` lists them.
# isort: off
from . import generate, chat, doctor, train, evaluate, bench, serve, convert, upload  # noqa: E402, F401
# isort: on


def main() -> None:
    try:
        app()
    except KVPredError as e:
        print(f"error: {cli_message(e)}", file=sys.stderr)
        sys.exit(2)
