"""`kvpred-mlx bench --server URL --soak N`: N requests from 8 clients against a running server, as a server left
running meets them: streamed and not, 10% of the streams abandoned mid-answer, 10% of the requests malformed. It
ends with what a server must keep: no 5xx, no lost request, every greedy answer equal to the answer that prompt got
first (on a fresh server: a fresh server's answer), and resident memory after the soak within 5% of after warm-up
(the first fifth of the requests: the prompt cache and MLX's buffer pool fill up there)."""

from __future__ import annotations

import random
import threading
import time
from typing import Callable

BAD_BODIES = [  # each must get a 4xx
    b"{not json", b'{"messages": []}', b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e9}',
    b'{"messages": [{"role": "user", "content": "\\ud800x"}]}', b'{"messages": [{"role": "tool", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', b'{"prompt": [1, 1000000000]}',
]
RSS_GROWTH_LIMIT = 0.05


def soak_prompts(document: str) -> list[list[dict]]:
    """Short chat questions and questions about a long held-out document (long enough for auto to predict)."""
    short = ["What is the capital of France?", "Name three colors.", "What is 12 plus 30?",
             "Give one word that rhymes with cat.", "What do bees make?"]
    prompts = [[{"role": "user", "content": q}] for q in short]
    for q in ("What is this text about?", "Summarize the first sentence.", "Which names appear in the text?"):
        prompts.append([{"role": "user", "content": f"{document}\n\n{q}"}])
    return prompts


def run_soak(client, prompts: list[list[dict]], *, requests: int, clients: int = 8, max_tokens: int = 16,
             seed: int = 0, progress: Callable[[], None] | None = None) -> dict:
    """The soak against `client` (server_client.ServerClient): warm-up answers each prompt once, in turn (the
    references), then `requests` requests from `clients` threads; returns the counts and the check of each target."""
    http = client.http
    body = lambda messages, stream: {"messages": messages, "max_tokens": max_tokens, "temperature": 0,  # noqa: E731
                                     "stream": stream}
    reference = []
    for messages in prompts:
        r = http.post("/v1/chat/completions", json=body(messages, False), timeout=600)
        r.raise_for_status()
        reference.append(r.json()["choices"][0]["message"]["content"])
        if progress:
            progress()
    rng = random.Random(seed)
    plan = [("bad" if u < 0.1 else "abandon" if u < 0.2 else "stream" if u < 0.6 else "plain", rng.randrange(
        len(prompts)), rng.randrange(len(BAD_BODIES))) for u in (rng.random() for _ in range(requests))]
    counts = {"ok": 0, "4xx": 0, "5xx": 0, "abandoned": 0, "mismatch": 0, "lost": 0, "bad_not_refused": 0}
    lock = threading.Lock()

    def one(kind: str, p: int, bad: int) -> str:
        if kind == "bad":
            r = http.post("/v1/chat/completions", content=BAD_BODIES[bad], timeout=600,
                          headers={"content-type": "application/json"})
            return "5xx" if r.status_code >= 500 else "4xx" if r.status_code >= 400 else "bad_not_refused"
        if kind == "plain":
            r = http.post("/v1/chat/completions", json=body(prompts[p], False), timeout=600)
            if r.status_code >= 500:
                return "5xx"
            return "ok" if r.json()["choices"][0]["message"]["content"] == reference[p] else "mismatch"
        with http.stream("POST", "/v1/chat/completions", json=body(prompts[p], True), timeout=600) as r:
            if r.status_code >= 500:
                return "5xx"
            parts, events = [], 0
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events += 1
                if kind == "abandon" and events == 3:
                    return "abandoned"
                chunk = _json(line[6:])
                if "error" in chunk:
                    return "5xx"
                parts += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
        return "ok" if "".join(parts) == reference[p] else "mismatch"

    def worker(todo) -> None:
        while True:
            with lock:
                job = next(todo, None)
            if job is None:
                return
            try:
                outcome = one(*job)
            except Exception:  # noqa: BLE001  (a timeout or a dropped connection: the request was lost)
                outcome = "lost"
            with lock:
                counts[outcome] += 1
            if progress:
                progress()

    def run(part: list) -> None:
        todo = iter(part)
        threads = [threading.Thread(target=worker, args=(todo,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    tic = time.perf_counter()
    warmup = max(requests // 5, clients)
    run(plan[:warmup])
    rss_warm = http.get("/health").json().get("rss_bytes")
    run(plan[warmup:])
    elapsed = time.perf_counter() - tic
    rss_end = http.get("/health").json().get("rss_bytes")
    growth = (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None
    checks = {"no 5xx": counts["5xx"] == 0, "no lost request": counts["lost"] == 0,
              "greedy answers equal the first ones": counts["mismatch"] == 0,
              "bad requests refused with 4xx": counts["bad_not_refused"] == 0,
              f"RSS growth under {RSS_GROWTH_LIMIT:.0%}": growth is not None and growth < RSS_GROWTH_LIMIT}
    return {"requests": requests, "clients": clients, "counts": counts, "seconds": elapsed,
            "requests_per_s": requests / elapsed, "rss_after_warmup": rss_warm, "rss_after": rss_end,
            "rss_growth": growth, "checks": checks, "passed": all(checks.values())}


def _json(text: str) -> dict:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return {"error": text}


def print_soak(result: dict) -> None:
    c = result["counts"]
    print(f"soak: {result['requests']} requests from {result['clients']} clients in {result['seconds']:.0f} s "
          f"({result['requests_per_s']:.2f}/s): {c['ok']} answered as first, {c['abandoned']} abandoned mid-stream, "
          f"{c['4xx']} refused (4xx), {c['5xx']} 5xx, {c['mismatch']} differing answers, {c['lost']} lost")
    growth = result["rss_growth"]
    print(f"RSS after warm-up {result['rss_after_warmup'] / 1e9:.2f} GB, after {result['rss_after'] / 1e9:.2f} GB "
          f"({growth:+.1%})" if growth is not None else "RSS: the server does not report it")
    for name, ok in result["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
