"""`kvpred-mlx serve`: an OpenAI-compatible HTTP API (chat and text completions, streaming or not) over one model.

One worker thread owns the model and answers requests in order of arrival. A prompt cache of ChatSessions keyed by
token prefix (LRU, bounded in entries and bytes) lets a follow-up request process only its new tokens, and while no
request waits the worker repairs the predicted K/V of cached sessions, one chunk at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import KVPredError
from .pipeline import DEFAULT_EXACT_TAIL, Pipeline, check_prompt
from .session import ChatSession, common_prefix, conversation_ids

DEFAULT_CACHE_ENTRIES = 8
DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_SHUTDOWN_GRACE = 10.0  # s running requests get to finish on SIGTERM/SIGINT
REQUEST_BYTES_PER_TOKEN = 64  # the default body limit: this many bytes per token of the model's context ...
MIN_REQUEST_BYTES = 1 << 20  # ... and at least this
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


# ---- requests ---------------------------------------------------------------------------------------------------

class Message(BaseModel):
    """A chat message as current OpenAI clients send it: content a string or a list of text parts; the developer
    role is the system role of newer models."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionFields(BaseModel):
    """What chat and text completions share; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # OpenAI's range
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = None
    user: str | None = None  # whose conversation this is: the prompt cache is kept per user (and API key)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    kvp_mode: Literal["auto", "kvp", "base"] | None = None  # extension: how the prompt is prefilled
    exact_tail: int | None = Field(None, ge=1)  # extension: prompt tokens the base computes itself in kvp

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop strings, none of them empty")
        return stop


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1)


class TextRequest(CompletionFields):
    prompt: str | list[int] = Field(min_length=1)  # text, or token ids (as OpenAI's API allows)


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as the chat template takes them: text parts joined, developer as system. A tool message, a part
    that is not text, or text that is not valid Unicode is refused, naming the field."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role in ("tool", "function"):
            raise KVPredError(f"{where}.role: {m.role} messages are not supported (this server calls no tools)")
        content = m.content
        if content is None:
            if m.role != "assistant":
                raise KVPredError(f"{where}.content: missing")
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise KVPredError(f"{where}.content[{j}]: only text parts are supported, got type "
                                      f"{part.get('type')!r}")
                parts.append(part["text"])
            content = "".join(parts)
        check_unicode(content, f"{where}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def check_unicode(text: str, where: str) -> None:
    """Refuse text that cannot be encoded (a lone UTF-16 surrogate, as JSON's \\ud800 escapes can make)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise KVPredError(f"{where}: not valid Unicode (a lone surrogate at character {e.start})") from None


# ---- the worker -------------------------------------------------------------------------------------------------

@dataclass(eq=False)  # each job is itself (hashable, kept in Engine.active)
class Job:
    """One request for the worker; its events go back to the request's event loop."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    mode: str
    exact_tail: int
    owner: str  # whose prompt-cache entries it may reuse
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class PromptCache:
    """ChatSessions keyed by their tokens: `take` finds the one sharing the longest prefix with a prompt."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.sessions: OrderedDict[int, ChatSession] = OrderedDict()  # least recently used first
        self.owners: dict[int, str] = {}  # who may reuse each entry (an API key and/or a user, or "" for all)
        self.lock = threading.Lock()  # the model thread changes the entries; /health reads them

    def status(self) -> dict:
        """Entries and the positions their sessions have left to repair (safe from any thread)."""
        with self.lock:
            sessions = list(self.sessions.values())
        return {"cached_sessions": len(sessions), "repair_pending_tokens": sum(s.pending_repair for s in sessions)}

    def take(self, prompt: list[int], owner: str = "") -> ChatSession | None:
        """The session of `owner` to answer `prompt` with: a cached one wholly a prefix of it (removed from the
        cache), a copy of the shared part of one that diverges (the original stays), or None."""
        best, best_len = None, 0
        for key, session in self.sessions.items():
            if self.owners.get(key, "") != owner:
                continue
            n = common_prefix(session.tokens, prompt)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None
        session = self.sessions[best]
        if best_len == len(session.tokens):
            with self.lock:
                self.owners.pop(best, None)
                return self.sessions.pop(best)
        return session.fork(best_len)

    def put(self, session: ChatSession, owner: str = "") -> None:
        with self.lock:
            self.sessions[id(session)] = session
            self.owners[id(session)] = owner
            self.sessions.move_to_end(id(session))
            while self.sessions and (len(self.sessions) > self.max_entries or self.nbytes() > self.max_bytes):
                key, _ = self.sessions.popitem(last=False)
                self.owners.pop(key, None)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def needing_repair(self) -> ChatSession | None:
        """The most recently used session with predicted K/V left."""
        return next((s for s in reversed(self.sessions.values()) if s.pending_repair), None)


class Engine:
    """The model's one thread: requests in order of arrival, idle-time repair in between."""

    def __init__(self, pipe: Pipeline, *, mode: str = "auto", exact_tail: int = DEFAULT_EXACT_TAIL,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.pipe, self.mode, self.exact_tail = pipe, mode, exact_tail
        self.cache = PromptCache(cache_entries, cache_bytes)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active: set[Job] = set()  # queued or running (what a shutdown must end)
        self.draining = False  # shutting down: new requests are refused with 503
        self.busy = False  # answering or repairing (for /health)
        self.thread = threading.Thread(target=self._run, name="kvpred-mlx-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.active.add(job)
        self.jobs.put(job)

    def end_all(self, message: str) -> None:
        """Every queued or running answer ends now with a 503 error (event), its client told why."""
        for job in list(self.active):
            job.cancelled.set()
            job.send("error", (503, message))

    def _run(self) -> None:
        import mlx.core as mx

        try:
            if self.pipe.bundle is not None and self.mode == "auto":
                from .pipeline import prefill_rates

                # the one-time probe, before the first request and on this thread: MLX streams (and the compiled
                # kernels traced on them) belong to the thread that made them
                prefill_rates(self.pipe)
            self._serve_jobs()
        finally:
            mx.clear_streams()  # MLX needs a thread's streams released before it ends, or exit may abort

    def _serve_jobs(self) -> None:
        waiting = _QueueNotEmpty(self.jobs)
        while True:
            try:
                job = self.jobs.get(timeout=0.05)
            except queue.Empty:
                session = self.cache.needing_repair()
                if session is not None:
                    self.busy = True
                    session.repair(stop=waiting)
                self.busy = False
                continue
            self.busy = True
            if job is None:
                return
            try:
                if job.cancelled.is_set():
                    job.send("done")
                else:
                    self._answer(job)
            except KVPredError as e:
                job.send("error", (400, str(e)))
            except Exception as e:  # noqa: BLE001  (the worker keeps serving; the client gets a 500)
                traceback.print_exc(file=sys.stderr)  # the operator sees what the client only gets a line of
                job.send("error", (500, f"{e.__class__.__name__}: {e}"))
            finally:
                self.active.discard(job)

    def _answer(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        session = self.cache.take(job.prompt, job.owner) or ChatSession(self.pipe, mode=job.mode,
                                                                        exact_tail=job.exact_tail)
        session.set_mode(job.mode)
        session.exact_tail = job.exact_tail
        repaired = 0
        if job.mode == "base" and session.pending_repair:  # base reads exact K/V only: the predicted ones first
            repaired = session.repair()
        if job.seed is not None:
            mx.random.seed(job.seed)
        sampler = make_sampler(temp=job.temperature, top_p=job.top_p)
        answered = False
        try:
            last = None
            for last in session.stream_tokens(job.prompt, max_tokens=job.max_tokens, sampler=sampler):
                if job.cancelled.is_set():  # the client left, or a stop string ended the answer
                    break
                job.send("text", last.text)
            turn = session.turns[-1]
            job.send("end", {"finish_reason": (last.finish_reason if last else None) or "stop",
                             "completion_tokens": last.generation_tokens if last else 0,
                             "prompt_tokens": turn.prompt_tokens, "cached_tokens": turn.cached_tokens,
                             "kvp": {"mode": turn.mode, "reason": turn.reason, "ttft_s": turn.ttft,
                                     "predicted_tokens": turn.predicted_tokens, "repaired_tokens": repaired}})
            answered = True
        finally:
            if answered:  # a failed turn may have left the session half-extended: it is not reused
                self.cache.put(session, job.owner)


class _QueueNotEmpty:
    """An Event-like stop signal for repair(): set while a request waits."""

    def __init__(self, q: queue.Queue):
        self.q = q

    def is_set(self) -> bool:
        return not self.q.empty()


# ---- the HTTP API -----------------------------------------------------------------------------------------------

def error_body(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


@dataclass
class ServerOptions:
    """Who may use the server and how much it accepts (the defaults are what `kvpred-mlx serve` ships)."""

    api_keys: tuple[str, ...] = ()  # empty: no key needed; else `Authorization: Bearer KEY` with one of them
    shared_prompt_cache: bool = False  # False: a prompt-cache entry is reused only by the key and user that made it
    allowed_hosts: tuple[str, ...] | None = LOCAL_HOSTS  # Host headers answered (None: any); the bound one is added
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API from a browser (none by default)
    max_request_bytes: int | None = None  # None: REQUEST_BYTES_PER_TOKEN per token of context, >= MIN_REQUEST_BYTES
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE


def allowed_hosts(bound: str, spec: str | None = None) -> tuple[str, ...] | None:
    """ServerOptions.allowed_hosts from `--allowed-hosts`: a comma-separated list, "*" for any (None); by default
    the local names and the bound address (a wildcard address names no host)."""
    if spec == "*":
        return None
    if spec:
        return tuple(h.strip() for h in spec.split(",") if h.strip())
    return LOCAL_HOSTS + ((bound,) if bound not in ("0.0.0.0", "::") else ())


def create_app(pipe: Pipeline, *, mode: str = "auto", exact_tail: int = DEFAULT_EXACT_TAIL,
               cache_entries: int = DEFAULT_CACHE_ENTRIES, cache_bytes: int = DEFAULT_CACHE_BYTES,
               options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    engine = Engine(pipe, mode=mode, exact_tail=exact_tail, cache_entries=cache_entries, cache_bytes=cache_bytes)
    model_id = pipe.model_id
    max_bytes = options.max_request_bytes or max(MIN_REQUEST_BYTES,
                                                 REQUEST_BYTES_PER_TOKEN * (pipe.context_length or 8192))

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    # what a client needs and no more: no interactive docs or schema, no absolute paths in /health
    app = FastAPI(title="kvpred-mlx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.options = options
    if options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(RequestGuard, engine=engine, options=options, max_bytes=max_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_body(422 if first.get("type") != "json_invalid" else 400,
                          f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error_body(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "bundle": pipe.bundle.path.name if pipe.bundle else None,
                **engine.cache.status(), "queued": engine.jobs.qsize(), "busy": engine.busy or not engine.jobs.empty(),
                "rss_bytes": resident_bytes()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "kvpred-mlx"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        try:
            messages = template_messages(body.messages)
            prompt = await asyncio.to_thread(conversation_ids, pipe.tokenizer, messages)  # off the event loop
        except KVPredError as e:
            return error_body(400, str(e), "messages")
        return await complete(body, prompt, chat=True, request=request)

    @app.post("/v1/completions")
    async def completions(body: TextRequest, request: Request):
        tok = pipe.tokenizer
        if isinstance(body.prompt, list):
            vocab = pipe.base.config["vocab_size"]
            if not all(0 <= t < vocab for t in body.prompt):
                return error_body(400, f"prompt: token ids must be in 0..{vocab - 1}", "prompt")
            return await complete(body, body.prompt, chat=False, request=request)
        try:
            check_unicode(body.prompt, "prompt")
        except KVPredError as e:
            return error_body(400, str(e), "prompt")
        special = tok.bos_token is None or not body.prompt.startswith(tok.bos_token)
        prompt = await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=special)
        return await complete(body, list(prompt), chat=False, request=request)

    async def complete(body: CompletionFields, prompt: list[int], *, chat: bool, request: Request):
        if body.model is not None and body.model not in (model_id, pipe.base.source):
            return error_body(400, f"unknown model {body.model!r}; this server serves {model_id!r}", "model")
        if not prompt:
            return error_body(400, "the prompt has no tokens", "prompt")
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        try:
            check_prompt(pipe, _array(prompt))
            limit = pipe.context_length
            if limit and len(prompt) + max_tokens > limit:
                raise KVPredError(f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: over the "
                                  f"model's context of {limit}")
            if body.kvp_mode == "kvp" and pipe.bundle is None:
                raise KVPredError("kvp_mode kvp needs a KVP bundle; this server runs the base alone")
        except KVPredError as e:
            return error_body(400, str(e), "messages" if chat else "prompt")
        owner = "" if options.shared_prompt_cache else f"{request.scope.get('kvpred_key', '')}\x00{body.user or ''}"
        job = Job(prompt, max_tokens, body.temperature, body.top_p, body.seed, body.kvp_mode or mode,
                  body.exact_tail or exact_tail, owner, asyncio.get_running_loop(), asyncio.Queue())
        engine.submit(job)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            # on shutdown the stream goes on for the grace period (serve: then an error event ends it), not cut
            return EventSourceResponse(stream_events(job, stops, meta, chat=chat, include_usage=usage), ping=600,
                                       shutdown_event=anyio.Event(), shutdown_grace_period=options.shutdown_grace + 1)
        watcher = asyncio.create_task(cancel_when_gone(request, job))  # a client that gave up frees the model
        try:
            text, end = await collect(job, stops)
        except _JobError as e:
            return error_body(e.status, e.message)
        finally:
            watcher.cancel()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = end["finish_reason"]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage_of(end), "kvp": end["kvp"]}

    return app


class RequestGuard:
    """Before a request reaches the API: its Host is one this server answers (DNS rebinding: a web page reaching a
    local server under another name), the server is not shutting down, its API key is right, and its body is not
    over the limit. Each refusal is an OpenAI-style error. Pure ASGI, so endpoints still see client disconnects."""

    def __init__(self, app, *, engine: Engine, options: ServerOptions, max_bytes: int):
        self.app, self.engine, self.options, self.max_bytes = app, engine, options, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await error_body(*refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        hosts = self.options.allowed_hosts
        if hosts is not None and host_name(headers.get("host", "")) not in hosts:
            return 403, f"Host {headers.get('host', '')!r} is not one this server answers (--allowed-hosts)"
        if self.engine.draining and scope["path"] != "/health":
            return 503, "the server is shutting down"
        if self.options.api_keys and scope["path"].startswith("/v1/"):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or key.strip() not in self.options.api_keys:
                return 401, "missing or wrong API key (Authorization: Bearer KEY)"
            scope["kvpred_key"] = hashlib.sha256(key.strip().encode()).hexdigest()[:16]
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is None:
                return 411, "a request body needs a Content-Length"
            if not length.isdigit() or int(length) > self.max_bytes:
                return 413, f"the request body is over {self.max_bytes} bytes (--max-request-bytes)"
        return None


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8080" -> "::1")."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def cancel_when_gone(request: Request, job: Job, every: float = 0.25) -> None:
    """Cancel `job` once its client disconnects (a non-streamed request whose client gave up)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(every)


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run `app` with uvicorn until SIGINT/SIGTERM. On the signal new requests get 503, running ones have the
    options' shutdown_grace seconds to finish, and any still running then end with an error the client sees (a
    stream's error event and [DONE]) instead of a cut connection."""
    import uvicorn

    engine, grace = app.state.engine, app.state.options.shutdown_grace

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not engine.draining:
                engine.draining = True
                loop = asyncio.get_event_loop()
                loop.call_soon_threadsafe(loop.call_later, grace, engine.end_all, "the server shut down before "
                                          "this answer finished")
            super().handle_exit(sig, frame)

    def interrupted(_sig, _frame):  # uvicorn re-raises the signal it stopped on: end as Ctrl-C does, exit code 0
        raise KeyboardInterrupt

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace + 2)
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        GracefulServer(config).run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _array(tokens: list[int]):
    import mlx.core as mx

    return mx.array(tokens)


class _JobError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def usage_of(end: dict) -> dict:
    return {"prompt_tokens": end["prompt_tokens"], "completion_tokens": end["completion_tokens"],
            "total_tokens": end["prompt_tokens"] + end["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": end["cached_tokens"]}}


async def text_pieces(job: Job, stops: list[str]):
    """The answer's text as it comes, cut at the first stop string (text that may start one is held back);
    ends with ("end", info). A stop string or a closed client cancels the job, freeing the model."""
    pending = ""
    hold = max((len(s) for s in stops), default=1) - 1
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise _JobError(*value)
            if kind == "done":
                return
            if kind == "text":
                pending += value
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    job.cancelled.set()
                    if pending[:cut]:
                        yield "text", pending[:cut]
                    while True:  # the worker stops at its next token
                        kind, value = await job.events.get()
                        if kind in ("end", "error", "done"):
                            break
                    yield "end", {**value, "finish_reason": "stop"} if kind == "end" else None
                    return
                ready = len(pending) - hold if hold else len(pending)
                if ready > 0:
                    yield "text", pending[:ready]
                    pending = pending[ready:]
            elif kind == "end":
                if pending:
                    yield "text", pending
                yield "end", value
                return
    finally:
        job.cancelled.set()  # no-op once finished; frees the model when the client went away mid-answer


async def collect(job: Job, stops: list[str]) -> tuple[str, dict]:
    parts, end = [], None
    async for kind, value in text_pieces(job, stops):
        if kind == "text":
            parts.append(value)
        else:
            end = value
    return "".join(parts), end or _stopped_end(job)


def _stopped_end(job: Job) -> dict:
    """The end of an answer cut by a stop string (the worker's own end event was consumed while it stopped)."""
    return {"finish_reason": "stop", "completion_tokens": 0, "prompt_tokens": len(job.prompt), "cached_tokens": 0,
            "kvp": {}}


async def stream_events(job: Job, stops: list[str], meta: dict, *, chat: bool, include_usage: bool):
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict | str | None, finish: str | None = None) -> str:
        if chat:
            choices = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
        return json.dumps({**meta, "object": kind_name, "choices": choices})

    if chat:
        yield chunk({"role": "assistant", "content": ""})
    try:
        async for kind, value in text_pieces(job, stops):
            if kind == "text":
                yield chunk({"content": value} if chat else value)
                continue
            end = value or _stopped_end(job)
            yield chunk({} if chat else "", end["finish_reason"])
            if include_usage:
                yield json.dumps({**meta, "object": kind_name, "choices": [], "usage": usage_of(end),
                                  "kvp": end["kvp"]})
    except _JobError as e:
        yield json.dumps({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
    yield "[DONE]"
