"""`kvpred-mlx serve`: an OpenAI-compatible HTTP API (chat and text completions, streaming or not) over one model.

One worker thread owns the model and answers requests in order of arrival. A prompt cache of ChatSessions keyed by
token prefix (LRU, bounded in entries and bytes) lets a follow-up request process only its new tokens, and while no
request waits the worker repairs the predicted K/V of cached sessions, one chunk at a time.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import KVPredError
from .pipeline import DEFAULT_EXACT_TAIL, Pipeline, check_prompt
from .session import ChatSession, common_prefix, conversation_ids

DEFAULT_CACHE_ENTRIES = 8
DEFAULT_CACHE_BYTES = 4 << 30


# ---- requests ---------------------------------------------------------------------------------------------------

class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionFields(BaseModel):
    """What chat and text completions share; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    kvp_mode: Literal["auto", "kvp", "base"] | None = None  # extension: how the prompt is prefilled
    exact_tail: int | None = Field(None, ge=1)  # extension: prompt tokens the base computes itself in kvp


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1)


class TextRequest(CompletionFields):
    prompt: str | list[int] = Field(min_length=1)  # text, or token ids (as OpenAI's API allows)


# ---- the worker -------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One request for the worker; its events go back to the request's event loop."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    mode: str
    exact_tail: int
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
        self.lock = threading.Lock()  # the model thread changes the entries; /health reads them

    def status(self) -> dict:
        """Entries and the positions their sessions have left to repair (safe from any thread)."""
        with self.lock:
            sessions = list(self.sessions.values())
        return {"cached_sessions": len(sessions), "repair_pending_tokens": sum(s.pending_repair for s in sessions)}

    def take(self, prompt: list[int]) -> ChatSession | None:
        """The session to answer `prompt` with: a cached one wholly a prefix of it (removed from the cache), a copy
        of the shared part of one that diverges (the original stays), or None."""
        best, best_len = None, 0
        for key, session in self.sessions.items():
            n = common_prefix(session.tokens, prompt)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None
        session = self.sessions[best]
        if best_len == len(session.tokens):
            with self.lock:
                return self.sessions.pop(best)
        return session.fork(best_len)

    def put(self, session: ChatSession) -> None:
        with self.lock:
            self.sessions[id(session)] = session
            self.sessions.move_to_end(id(session))
            while self.sessions and (len(self.sessions) > self.max_entries or self.nbytes() > self.max_bytes):
                self.sessions.popitem(last=False)

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
        self.busy = False  # answering or repairing (for /health)
        self.thread = threading.Thread(target=self._run, name="kvpred-mlx-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

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
            if job.cancelled.is_set():
                job.send("done")
                continue
            try:
                self._answer(job)
            except KVPredError as e:
                job.send("error", (400, str(e)))
            except Exception as e:  # noqa: BLE001  (the worker keeps serving; the client gets a 500)
                traceback.print_exc(file=sys.stderr)  # the operator sees what the client only gets a line of
                job.send("error", (500, f"{e.__class__.__name__}: {e}"))

    def _answer(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        session = self.cache.take(job.prompt) or ChatSession(self.pipe, mode=job.mode, exact_tail=job.exact_tail)
        session.set_mode(job.mode)
        session.exact_tail = job.exact_tail
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
                                     "predicted_tokens": turn.predicted_tokens}})
            answered = True
        finally:
            if answered:  # a failed turn may have left the session half-extended: it is not reused
                self.cache.put(session)


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


def create_app(pipe: Pipeline, *, mode: str = "auto", exact_tail: int = DEFAULT_EXACT_TAIL,
               cache_entries: int = DEFAULT_CACHE_ENTRIES, cache_bytes: int = DEFAULT_CACHE_BYTES) -> FastAPI:
    engine = Engine(pipe, mode=mode, exact_tail=exact_tail, cache_entries=cache_entries, cache_bytes=cache_bytes)
    model_id = pipe.model_id

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="kvpred-mlx", lifespan=lifespan)
    app.state.engine = engine

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
        return {"status": "ok", "model": model_id, "bundle": str(pipe.bundle.path) if pipe.bundle else None,
                **engine.cache.status(), "queued": engine.jobs.qsize(), "busy": engine.busy or not engine.jobs.empty()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "kvpred-mlx"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        try:
            prompt = conversation_ids(pipe.tokenizer, [m.model_dump() for m in body.messages])
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
        prompt = tok.encode(body.prompt, add_special_tokens=tok.bos_token is None
                            or not body.prompt.startswith(tok.bos_token))
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
        loop = asyncio.get_running_loop()
        job = Job(prompt, max_tokens, body.temperature, body.top_p, body.seed, body.kvp_mode or mode,
                  body.exact_tail or exact_tail, loop, asyncio.Queue())
        engine.jobs.put(job)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(stream_events(job, stops, meta, chat=chat, include_usage=usage),
                                       ping=600)
        try:
            text, end = await collect(job, stops)
        except _JobError as e:
            return error_body(e.status, e.message)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = end["finish_reason"]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage_of(end), "kvp": end["kvp"]}

    return app


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
