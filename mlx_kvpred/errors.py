"""The one error type users see: a one-line message naming the file or flag at fault."""


class KVPredError(Exception):
    """Bad input (file, flag, bundle). The CLI prints `error: <message>` and exits with code 2."""
