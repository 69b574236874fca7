"""kvpred-mlx serve: the OpenAI-compatible HTTP server (server.py)."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from ..errors import KVPredError
from .common import app, MODEL, KVP, DEVICE, ALLOW_UNTRAINED, EXACT_TAIL, EXACT_HEAD, check_policy_flags, load_for_generation


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the model to your network)."),
    port: int = typer.Option(8080, help="TCP port."),
    model: Optional[str] = MODEL,
    kvp: Optional[str] = KVP,
    mode: str = typer.Option("auto", help="Default prefill mode of requests: kvp, base or auto (a request's "
                                          "kvp_mode field overrides it)."),
    exact_tail: Optional[int] = EXACT_TAIL,
    exact_head: Optional[int] = EXACT_HEAD,
    prompt_cache_size: int = typer.Option(8, help="Conversations kept in the prompt cache (LRU)."),
    prompt_cache_bytes: int = typer.Option(4 << 30, help="Byte bound of the prompt cache (LRU)."),
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
):
    """Serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health), streaming, with KV
    prediction and a prompt cache across requests. Needs the server extra: pip install -e ".[server]"."""
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        raise KVPredError(f"serve needs the server extra: pip install -e \".[server]\" ({e.name} is missing)") from None
    tail = check_policy_flags(exact_tail, None, None)
    if mode not in ("auto", "kvp", "base"):
        raise KVPredError(f"--mode must be auto, kvp or base, got {mode!r}")
    if prompt_cache_size < 0 or prompt_cache_bytes < 0 or not 0 < port < 65536:
        raise KVPredError("--prompt-cache-size and --prompt-cache-bytes must be >= 0, --port in 1..65535")
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=True, exact_head=exact_head)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {host}: anyone who can reach this machine can use the model", file=sys.stderr)
    app = create_app(pipe, mode=mode, exact_tail=tail, cache_entries=prompt_cache_size, cache_bytes=prompt_cache_bytes)
    print(f"serving {pipe.base.source} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
