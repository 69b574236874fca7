"""The one error type users see: a one-line message naming the file or option at fault."""

from __future__ import annotations

import re


class KVPredError(Exception):
    """Bad input (file, option, bundle). `fields` are the options the message names, spelled as the Python API
    spells them (exact_tail); the CLI shows them as its flags (--exact-tail, `cli_message`), the server as the
    request's fields. The CLI prints `error: <message>` and exits with code 2; the server answers 400."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


def cli_message(error: KVPredError) -> str:
    """The message with each of its fields written as the CLI flag of that name (exact_tail -> --exact-tail); a
    quoted word ('kvp', a value) stays as it is."""
    message = str(error)
    for name in getattr(error, "fields", ()):
        message = re.sub(rf"(?<![\w'\"-]){re.escape(name)}\b", "--" + name.replace("_", "-"), message)
    return message
