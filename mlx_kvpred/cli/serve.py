"""kvpred-mlx serve: the OpenAI-compatible HTTP server (server.py)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import KVPredError
from .common import ALLOW_UNTRAINED, DEVICE, EXACT_HEAD, EXACT_KEEP, EXACT_TAIL, KVP, MODEL, app, check_policy_flags, \
    load_for_generation


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
    exact_keep: Optional[float] = EXACT_KEEP,
    prompt_cache_size: int = typer.Option(8, help="Conversations kept in the prompt cache (LRU)."),
    prompt_cache_bytes: int = typer.Option(4 << 30, help="Byte bound of the prompt cache (LRU)."),
    api_key: Optional[list[str]] = typer.Option(None, help="Require `Authorization: Bearer KEY` on /v1 with one of "
                                                           "these keys (repeatable). Default: no key."),
    shared_prompt_cache: bool = typer.Option(False, help="Let every client reuse every cached conversation. "
                                                         "Default: an entry is reused only by the API key and "
                                                         "`user` field that made it."),
    allowed_hosts: Optional[str] = typer.Option(None, help="Host headers answered, comma-separated, or * for any "
                                                           "(default: localhost, 127.0.0.1, ::1 and --host)."),
    cors_origin: Optional[list[str]] = typer.Option(None, help="An origin whose web pages may call the API "
                                                               "(repeatable). Default: none."),
    max_request_bytes: Optional[int] = typer.Option(None, help="Larger request bodies get 413 (default: 64 bytes "
                                                               "per token of the model's context, at least 1 MiB)."),
    shutdown_grace: float = typer.Option(10.0, help="Seconds running requests get to finish on Ctrl-C or SIGTERM; "
                                                    "then they end with an error the client sees."),
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
):
    """Serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health), streaming, with KV
    prediction and a prompt cache across requests. Needs the server extra: pip install -e ".\\[server]"."""
    try:
        from ..server import LOCAL_HOSTS, ServerOptions, create_app
        from ..server import allowed_hosts as server_hosts
        from ..server import serve as run_server
    except ImportError as e:
        raise KVPredError(f"serve needs the server extra: pip install -e \".[server]\" ({e.name} is missing)") from None
    tail = check_policy_flags(exact_tail, None, None)
    if mode not in ("auto", "kvp", "base"):
        raise KVPredError(f"--mode must be auto, kvp or base, got {mode!r}")
    if prompt_cache_size < 0 or prompt_cache_bytes < 0 or not 0 < port < 65536:
        raise KVPredError("--prompt-cache-size and --prompt-cache-bytes must be >= 0, --port in 1..65535")
    if (max_request_bytes is not None and max_request_bytes < 1024) or shutdown_grace < 0:
        raise KVPredError("--max-request-bytes must be >= 1024 and --shutdown-grace >= 0")
    if any(not k.strip() for k in api_key or []):
        raise KVPredError("--api-key: a key cannot be empty")
    hosts = server_hosts(host, allowed_hosts)
    options = ServerOptions(api_keys=tuple(k.strip() for k in api_key or []), shared_prompt_cache=shared_prompt_cache,
                            allowed_hosts=hosts, cors_origins=tuple(cors_origin or []),
                            max_request_bytes=max_request_bytes, shutdown_grace=shutdown_grace)
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=True, exact_head=exact_head,
                               exact_keep=exact_keep)
    if host not in LOCAL_HOSTS:
        print(f"WARNING: binding {host}: anyone who can reach this machine can use the model"
              + ("" if api_key else " (no --api-key)")
              + ("; clients must use a name in --allowed-hosts" if hosts is not None else ""), file=sys.stderr)
    app_ = create_app(pipe, mode=mode, exact_tail=tail, cache_entries=prompt_cache_size,
                      cache_bytes=prompt_cache_bytes, options=options)
    print(f"serving {pipe.base.source} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr,
          flush=True)
    run_server(app_, host=host, port=port)
