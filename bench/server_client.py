"""A client-side benchmark of `kvpred-mlx serve`: TTFT over HTTP against in-process generation, and a chat
conversation over HTTP.

- Per prompt length and mode, a fresh random-token prompt is sent to /v1/completions (streaming, one token) and
  the same prompt is run in this process by `stream_generate`, alternately. TTFT on the server side is the time
  from sending the request to its first streamed chunk, so it includes HTTP, queueing and the prompt cache lookup.
  Requests go through the official `openai` client, as applications send them; /health (not in the OpenAI API)
  through httpx.
- A conversation over /v1/chat/completions: a held-out document and a question, then follow-up questions; each
  turn's TTFT (first content chunk) and the cached tokens the server reports.

Timing in-process work while the server is busy would time two models on the same cores, so each in-process run
waits until the server's /health says it is idle (no request, no repair left).
"""

from __future__ import annotations

import statistics
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import Pipeline, stream_generate

from .conversation import QUESTIONS

SERVER_MODES = ("base", "kvp", "auto")


@dataclass
class ServerClient:
    """A running server: `http` (httpx) for /health, `api` (openai.OpenAI) for the OpenAI endpoints, `model` its id."""

    http: Any
    api: Any
    model: str = ""


@contextmanager
def connect(url: str, *, api_key: str | None = None) -> Iterator[ServerClient]:
    try:
        import httpx
        import openai
    except ImportError as e:
        raise KVPredError(f"bench --server needs the bench extra: pip install -e \".[bench]\" ({e.name} is missing)"
                          ) from None

    base = url.rstrip("/")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, timeout=httpx.Timeout(600, connect=5), headers=headers) as http:
        with openai.OpenAI(base_url=f"{base}/v1", api_key=api_key or "unused", timeout=600, max_retries=0) as api:
            yield ServerClient(http, api)


def server_health(client: ServerClient) -> dict:
    import httpx

    try:
        r = client.http.get("/health")
    except httpx.HTTPError as e:
        raise KVPredError(f"--server: cannot reach {client.http.base_url} ({e.__class__.__name__})") from None
    if r.status_code != 200:
        raise KVPredError(f"--server: {client.http.base_url}/health answered {r.status_code}; is it a kvpred-mlx "
                          f"server?")
    return r.json()


def check_same_model(client: ServerClient, pipe: Pipeline) -> dict:
    """The server must serve the model and bundle this process loaded, or the comparison means nothing."""
    health = server_health(client)
    ours = pipe.bundle.path.name if pipe.bundle and pipe.bundle.path else None  # /health names no local paths
    if health.get("model") != pipe.model_id or health.get("bundle") != ours:
        raise KVPredError(f"--server serves {health.get('model')} (bundle {health.get('bundle')}), this bench loaded "
                          f"{pipe.model_id} (bundle {ours}): pass the server's --model and --kvp")
    client.model = health["model"]
    return health


def wait_until_idle(client, *, timeout: float = 600) -> None:
    """Until the server answers nothing and has no predicted K/V left to repair."""
    deadline = time.monotonic() + timeout
    while True:
        h = server_health(client)
        if not h.get("busy") and not h.get("repair_pending_tokens"):
            return
        if time.monotonic() > deadline:
            raise KVPredError(f"--server stayed busy for {timeout:.0f} s")
        time.sleep(0.05)


@contextmanager
def _api_errors() -> Iterator[None]:
    """An error the server answers (or a dropped connection) as one line naming --server."""
    import openai

    try:
        yield
    except openai.APIError as e:
        raise KVPredError(f"--server: {e.__class__.__name__}: {e}") from None


def server_ttft(client: ServerClient, prompt: list[int], *, mode: str, exact_tail: int) -> dict:
    """Send a token prompt for one token; the time to the first streamed chunk, and what the server reported."""
    tic = time.perf_counter()
    ttft, usage = None, {}
    with _api_errors():
        stream = client.api.completions.create(
            model=client.model, prompt=prompt, max_tokens=1, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"kvp_mode": mode, "exact_tail": exact_tail})
        for chunk in stream:
            ttft = ttft or time.perf_counter() - tic
            if chunk.usage:
                kvp = getattr(chunk, "kvp", None) or {}
                usage = {"cached_tokens": chunk.usage.prompt_tokens_details.cached_tokens,
                         "runs_as": kvp.get("mode"), "server_ttft": kvp.get("ttft_s")}
    if ttft is None:
        raise KVPredError("--server: the stream ended without a chunk")
    return {"ttft": ttft, **usage}


def local_ttft(pipe: Pipeline, prompt: list[int], *, mode: str, exact_tail: int) -> float:
    """The same request in this process: stream_generate's first response."""
    tic = time.perf_counter()
    next(iter(stream_generate(pipe, prompt, mode=mode, max_tokens=1, exact_tail=exact_tail)))
    return time.perf_counter() - tic


def compare_ttft(client: ServerClient, pipe: Pipeline, *, lengths: Sequence[int], modes: Sequence[str], repeats: int = 3,
                 warmup: int = 1, exact_tail: int = 32, seed: int = 0,
                 progress: Callable[[], None] | None = None) -> list[dict]:
    """Per length and mode, `warmup + repeats` pairs (in-process, server) on fresh random prompts."""
    bad = [m for m in modes if m not in SERVER_MODES]
    if bad:
        raise KVPredError(f"--modes with --server: unknown {bad}; choose from {', '.join(SERVER_MODES)}")
    rng = np.random.default_rng(seed)
    vocab = pipe.base.config["vocab_size"]
    rows = []
    for n in lengths:
        for mode in modes:
            local, remote, info = [], [], {}
            for r in range(warmup + repeats):
                prompt = rng.integers(0, vocab, n).tolist()  # new each time: no prompt-cache hits
                wait_until_idle(client)
                t_local = local_ttft(pipe, prompt, mode=mode, exact_tail=exact_tail)
                wait_until_idle(client)
                got = server_ttft(client, prompt, mode=mode, exact_tail=exact_tail)
                if r >= warmup:
                    local.append(t_local)
                    remote.append(got["ttft"])
                    info = got
                if progress:
                    progress()
            ratios = [s / lo for s, lo in zip(remote, local)]
            rows.append({"prompt_tokens": n, "mode": mode, "runs_as": info.get("runs_as"),
                         "local_ttft_median": statistics.median(local), "server_ttft_median": statistics.median(remote),
                         "ratio_median": statistics.median(ratios), "local_all": local, "server_all": remote,
                         "server_reported_ttft": info.get("server_ttft"), "cached_tokens": info.get("cached_tokens")})
    return rows


def conversation_over_http(client: ServerClient, document: str, *, questions: Sequence[str] = QUESTIONS,
                           answer_tokens: int = 32, progress: Callable[[], None] | None = None) -> list[dict]:
    """A chat over /v1/chat/completions (the server's own mode): document + question, then follow-ups. A new system
    message per call keeps an earlier run's cache from answering turn 1."""
    messages = [{"role": "system", "content": f"Conversation {uuid.uuid4().hex[:8]}. Answer briefly."},
                {"role": "user", "content": document + "\n\n" + questions[0]}]
    turns = []
    for i in range(len(questions)):
        wait_until_idle(client)
        tic = time.perf_counter()
        ttft, parts, usage, kvp = None, [], None, {}
        with _api_errors():
            stream = client.api.chat.completions.create(model=client.model, messages=messages,
                                                        max_tokens=answer_tokens, temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
            for chunk in stream:
                choice = chunk.choices[0] if chunk.choices else None
                if ttft is None and choice and (choice.delta.content or choice.finish_reason):
                    ttft = time.perf_counter() - tic
                parts.append((choice.delta.content or "") if choice else "")
                usage, kvp = chunk.usage or usage, getattr(chunk, "kvp", None) or kvp
        turns.append({"turn": i + 1, "ttft": ttft, "prompt_tokens": usage.prompt_tokens,
                      "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                      "mode": kvp.get("mode"), "server_ttft": kvp.get("ttft_s")})
        if i + 1 < len(questions):
            messages += [{"role": "assistant", "content": "".join(parts)}, {"role": "user", "content": questions[i + 1]}]
        if progress:
            progress()
    for t in turns:
        t["speedup_vs_turn1"] = turns[0]["ttft"] / t["ttft"]
    return turns


def print_server_comparison(url: str, rows: list[dict], turns: list[dict], *, repeats: int, doc_tokens: int) -> None:
    """compare_ttft's rows and conversation_over_http's turns as two tables."""
    print(f"server {url} vs this process, same prompts (random tokens, new each run), median of {repeats}")
    print(f"{'mode':>12} {'prompt':>6} {'in-process TTFT ms':>19} {'server TTFT ms':>15} {'server/in-process':>18}")
    for r in rows:
        mode = r["mode"] if r["runs_as"] in (None, r["mode"]) else f"{r['mode']} ({r['runs_as']})"
        print(f"{mode:>12} {r['prompt_tokens']:>6} {r['local_ttft_median'] * 1e3:>19.0f} "
              f"{r['server_ttft_median'] * 1e3:>15.0f} {r['ratio_median']:>18.3f}")
    print(f"chat over HTTP: a {doc_tokens}-token held-out document in turn 1, then short questions")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'mode':>5} {'TTFT ms':>8} {'turn 1 / this':>14}")
    for t in turns:
        print(f"{t['turn']:>4} {t['prompt_tokens']:>7} {t['cached_tokens']:>7} {t['mode'] or '':>5} "
              f"{t['ttft'] * 1e3:>8.0f} {t['speedup_vs_turn1']:>13.1f}x")
