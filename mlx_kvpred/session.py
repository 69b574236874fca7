"""Multi-turn chat on one cache: each turn processes only the tokens past the cached prefix, by the base when few and
by KV prediction when many (mode auto), and `repair()` later recomputes the predicted part exactly with the base.

The cache is a list of ordinary mlx-lm KVCache objects, saved and loaded with mlx-lm's prompt-cache functions; the
tokens, the conversation and which positions are not yet exact go in the file's metadata.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

from .atomic import atomic_write
from .attention import backbone, kv_heads
from .bundle import bundle_id, describe_base, fingerprints_match
from .cache import session_cache
from .errors import KVPredError
from .pipeline import (DEFAULT_EXACT_TAIL, KVPResponse, Pipeline, check_prompt, choose_mode, decode_from_stream,
                       first_predicted, keeps_exact, predict_cache, predict_span_with_exact_keep, prompt_then_decode,
                       require_text, split_exact_tail, stream_responses)

SESSION_FORMAT = "kvpred-mlx-session"
SESSION_VERSION = 1
DEFAULT_REPAIR_CHUNK = 256  # tokens per repair step: a new turn waits for at most one step


@dataclass
class TurnStats:
    prompt_tokens: int  # the whole conversation as the template renders it for this turn
    cached_tokens: int  # reused from the cache
    new_tokens: int  # processed this turn
    predicted_tokens: int  # of the new ones, by KV prediction
    mode: str
    reason: str
    ttft: float
    generation_tokens: int = 0
    generation_tps: float = 0.0


class ChatSession:
    """A conversation with a base cache that grows turn by turn.

    `stream(text)` adds a user turn and streams the answer (KVPResponse); `stream_tokens(ids)` does the same for a
    whole conversation already rendered to token ids (a server's request). `repair()` makes the cache exact.
    Every method that touches the cache holds `lock`, so a turn started during a repair waits for one repair step.
    """

    def __init__(self, pipe: Pipeline, *, system: str | None = None, mode: str = "auto",
                 exact_tail: int = DEFAULT_EXACT_TAIL, kvp_min_tokens: int | None = None,
                 ttft_budget: float | None = None, repair_chunk: int = DEFAULT_REPAIR_CHUNK):
        if repair_chunk < 1:
            raise KVPredError(f"repair_chunk must be >= 1, got {repair_chunk}")
        split_exact_tail(mx.array([0]), exact_tail)  # checks exact_tail >= 1
        self.pipe, self.system, self.exact_tail = pipe, system, exact_tail
        self.kvp_min_tokens, self.ttft_budget, self.repair_chunk = kvp_min_tokens, ttft_budget, repair_chunk
        self.set_mode(mode)
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        with self.lock:
            self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
            self.tokens: list[int] = []  # the tokens whose K/V the base cache holds, in order
            self.cache: list[Any] = session_cache(self.pipe.base.model)
            self.exact_until = 0  # the cache is the base's own (exact) K/V before this position
            self.predicted_spans: list[tuple[int, int]] = []  # [start, end) of K/V predicted, not yet repaired
            self.repaired_tokens = 0
            self.turns: list[TurnStats] = []
            self._aux_cache = session_cache(self.pipe.bundle.aux) if self.pipe.bundle is not None else None
            self._aux_tokens = 0  # the aux cache holds self.tokens[:_aux_tokens]

    def set_mode(self, mode: str) -> None:
        """How later turns prefill: kvp, base or auto (kvp needs a bundle)."""
        if mode in ("aux", "specprefill"):
            raise KVPredError("a chat session runs mode kvp, base or auto", "mode")
        if mode != "auto":
            choose_mode(self.pipe, mode, new_tokens=1)  # refuses an unknown mode, and kvp without a bundle
        self.mode = mode

    @property
    def predicted_tokens(self) -> int:
        """Positions whose K/V are still predicted (repair() replaces them)."""
        return sum(end - start for start, end in self.predicted_spans)

    @property
    def pending_repair(self) -> int:
        """Positions repair() would recompute: from the first predicted one to the end (later positions attended
        to predicted K/V, so they are not exact either)."""
        return len(self.tokens) - self.exact_until

    @property
    def nbytes(self) -> int:
        """Bytes held by the base and aux caches."""
        return sum(c.nbytes for c in self.cache) + sum(c.nbytes for c in self._aux_cache or [])

    def fork(self, n_tokens: int) -> "ChatSession":
        """A new session holding a copy of this one's first `n_tokens` (a prompt cache's diverging branch); this
        one is left as it is."""
        with self.lock:
            n = min(n_tokens, len(self.tokens))
            other = ChatSession(self.pipe, system=self.system, mode=self.mode, exact_tail=self.exact_tail,
                                kvp_min_tokens=self.kvp_min_tokens, ttft_budget=self.ttft_budget,
                                repair_chunk=self.repair_chunk)
            for mine, theirs in zip(self.cache, other.cache):
                if n:
                    theirs.state = (mx.array(mine.keys[..., :n, :]), mx.array(mine.values[..., :n, :]), n)
            aux_n = min(self._aux_tokens, n)
            for mine, theirs in zip(self._aux_cache or [], other._aux_cache or []):
                if aux_n:
                    theirs.state = (mx.array(mine.keys[..., :aux_n, :]), mx.array(mine.values[..., :aux_n, :]), aux_n)
            other.tokens, other._aux_tokens = self.tokens[:n], aux_n
            other.exact_until = min(self.exact_until, n)
            other.predicted_spans = [(s, min(e, n)) for s, e in self.predicted_spans if s < n]
            if n:
                mx.eval([c.state for c in other.cache])
            return other

    def stream(self, content: str, *, max_tokens: int = 256, mode: str | None = None,
               **kwargs) -> Iterator[KVPResponse]:
        """Add a user turn, stream the answer; the answer (what was streamed, if stopped early) joins the
        conversation. kwargs: sampler, logits_processors, ... (generate_step's)."""
        require_text(content, "the message")
        messages = self.messages + [{"role": "user", "content": content}]
        prompt = conversation_ids(self.pipe.tokenizer, messages)
        text = []
        try:
            with closing(self.stream_tokens(prompt, max_tokens=max_tokens, mode=mode, **kwargs)) as responses:
                for response in responses:
                    text.append(response.text)
                    yield response
        finally:
            self.messages = messages + [{"role": "assistant", "content": "".join(text)}]

    def send(self, content: str, **kwargs) -> str:
        """stream() as one string."""
        return "".join(r.text for r in self.stream(content, **kwargs))

    def stream_tokens(self, prompt: Sequence[int], *, max_tokens: int = 256, mode: str | None = None,
                      sampler: Callable | None = None, **kwargs) -> Iterator[KVPResponse]:
        """Answer the conversation `prompt` (token ids, the whole history): reuse the cached prefix, process the
        rest (kvp or base by `mode`, default the session's), stream the base's answer."""
        with self.lock:
            prompt = list(prompt)
            check_prompt(self.pipe, mx.array(prompt))
            cached = self._reuse_prefix(prompt)
            new = len(prompt) - cached
            exact_keep = self.pipe.exact_keep if keeps_exact(self.pipe) else 0.0
            choice = choose_mode(self.pipe, mode or self.mode, new_tokens=new, offset=cached,
                                 aux_lag=cached - self._aux_tokens, exact_tail=self.exact_tail,
                                 kvp_min_tokens=self.kvp_min_tokens, ttft_budget=self.ttft_budget,
                                 exact_keep=exact_keep)
            if choice.mode in ("aux", "specprefill"):  # specprefill drops positions a later turn may need
                raise KVPredError("a chat session runs mode kvp, base or auto", "mode")
            tic = time.perf_counter()
            end = cached + max(new - self.exact_tail, 0) if choice.mode == "kvp" else cached
            tail_stream = None  # with exact_keep: the tail's residual stream entering the first unshared layer
            if end > cached and exact_keep > 0 and kwargs.get("kv_bits") is None:
                n_predicted, tail_stream = self._predict(prompt, cached, end, exact_keep=exact_keep)
            else:
                n_predicted = self._predict(prompt, cached, end)[0] if end > cached else 0
            if not n_predicted and self.exact_until == cached:
                self.exact_until = len(prompt)  # the base computes everything new: still exact
            tail = mx.array(prompt[end:])
            if tail_stream is not None:
                step = decode_from_stream(self.pipe, tail, self.cache, tail_stream, max_tokens=max_tokens,
                                          sampler=sampler, **kwargs)
            else:
                step = prompt_then_decode(tail, self.pipe.base.model, backend=self.pipe.backend,
                                          prompt_cache=self.cache, max_tokens=max_tokens, sampler=sampler, **kwargs)
            stats = TurnStats(len(prompt), cached, new, n_predicted, choice.mode, choice.reason, 0.0)
            self.turns.append(stats)
            generated: list[int] = []
            try:
                for r in stream_responses(self.pipe, step, prompt_tokens=len(prompt), max_tokens=max_tokens,
                                          mode=choice.mode, reason=choice.reason, tic=tic):
                    generated.append(r.token)
                    stats.ttft, stats.generation_tokens, stats.generation_tps = (r.ttft, r.generation_tokens,
                                                                                 r.generation_tps)
                    yield r
            finally:
                self._settle(prompt + generated, len(prompt))

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Trim the caches to the longest prefix shared with `prompt`, keeping at least one token to process (the
        base needs it for the first output's logits); returns the reused length."""
        common = common_prefix(self.tokens, prompt[:-1])
        for c in self.cache:
            c.trim(c.offset - common)
        if self._aux_cache is not None and self._aux_tokens > common:
            for c in self._aux_cache:
                c.trim(c.offset - common)
            self._aux_tokens = common
        self.tokens = self.tokens[:common]
        self.exact_until = min(self.exact_until, common)
        self.predicted_spans = [(s, min(e, common)) for s, e in self.predicted_spans if s < common]
        return common

    def _predict(self, prompt: list[int], start: int, end: int, *, exact_keep: float = 0.0
                 ) -> tuple[int, mx.array | None]:
        """Predicted base K/V for prompt[start:end] into the session cache (positions below the pipeline's
        exact_head get the base's own); returns how many were predicted, and with `exact_keep` (KVP-LP) the exact
        tail's residual stream after it ran through the shared layers and the kept positions were recomputed
        (predict_span_with_exact_keep). The aux first catches up on tokens it has not seen; it also reruns the
        token before `start`, whose hidden state the predictor may read."""
        run_from = min(self._aux_tokens, max(start - 1, 0))
        for c in self._aux_cache:
            c.trim(c.offset - run_from)
        tail_stream = None
        if exact_keep > 0:
            tail_stream = predict_span_with_exact_keep(
                self.pipe, mx.array(prompt[run_from:]), self.cache, self._aux_cache, skip=start - run_from,
                exact_tail=len(prompt) - end, exact_keep=exact_keep)
        else:
            predict_cache(self.pipe, mx.array(prompt[run_from:end]), cache=self.cache, aux_cache=self._aux_cache,
                          skip=start - run_from)
        self._aux_tokens = end
        self.tokens = prompt[:end]
        first = first_predicted(self.pipe, start, end)
        if first < end:
            self.exact_until = first if self.exact_until >= start else self.exact_until
            self.predicted_spans.append((first, end))
        return end - first, tail_stream

    def _settle(self, tokens: list[int], prompt_tokens: int) -> None:
        """After a turn (finished or stopped): the cache holds the prompt and the generated tokens fed back to the
        model; record exactly those. Generated K/V are exact when the whole prompt was."""
        mx.eval([c.state for c in self.cache])
        # the shortest cache: with exact_keep the tail's shared layers run before the others (a turn stopped
        # before its first token leaves them ahead)
        offset = min(min(c.offset for c in self.cache), len(tokens))
        for c in self.cache:
            if c.offset > offset:
                c.trim(c.offset - offset)
        self.tokens = tokens[:offset]
        self.exact_until = len(self.tokens) if self.exact_until >= prompt_tokens else self.exact_until

    def repair(self, *, stop: threading.Event | None = None, progress: Callable[[int], None] | None = None) -> int:
        """Recompute with the base, `repair_chunk` tokens at a time, every position from the first predicted one to
        the end, so later turns attend to exact K/V. Stops early when `stop` is set (between steps). Returns the
        tokens recomputed."""
        done = 0
        while stop is None or not stop.is_set():
            with self.lock:
                if self.exact_until >= len(self.tokens):
                    break
                n = self._repair_step()
            done += n
            if progress:
                progress(n)
        return done

    def _repair_step(self) -> int:
        start = self.exact_until
        end = min(start + self.repair_chunk, len(self.tokens))
        views = []
        for c in self.cache:  # the cache up to `start` (exact), then the base's own K/V for start:end
            view = KVCache()
            view.state = (c.keys[..., :start, :], c.values[..., :start, :], start)
            views.append(view)
        backbone(self.pipe.base.model)(mx.array(self.tokens[start:end])[None], cache=views)
        for c, view in zip(self.cache, views):
            c.keys[..., start:end, :] = view.keys[..., start:end, :]
            c.values[..., start:end, :] = view.values[..., start:end, :]
        mx.eval([c.state for c in self.cache])
        self.exact_until = end
        self.repaired_tokens += end - start
        self.predicted_spans = [(max(s, end), e) for s, e in self.predicted_spans if e > end]
        return end - start

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the session to a .safetensors prompt-cache file (atomically); an existing file only if `overwrite`."""
        path = Path(path)
        check_session_path(path)
        if path.exists() and not overwrite:
            raise KVPredError(f"{path} already exists (overwrite=True replaces it)")
        with self.lock:
            mx.eval([c.state for c in self.cache])
            metadata = {
                "format": SESSION_FORMAT, "format_version": str(SESSION_VERSION),
                "base": json.dumps(_base_identity(self.pipe)), "bundle": bundle_id(self.pipe.bundle),
                "tokens": json.dumps(self.tokens), "exact_until": str(self.exact_until),
                "predicted_spans": json.dumps(self.predicted_spans), "repaired_tokens": str(self.repaired_tokens),
                "messages": json.dumps(self.messages), "system": json.dumps(self.system),
                "turns": json.dumps([asdict(t) for t in self.turns]),
            }
            atomic_write(path, lambda tmp: save_prompt_cache(tmp, self.cache, metadata))

    @classmethod
    def load(cls, pipe: Pipeline, path: str | Path, **options) -> "ChatSession":
        """A session saved by save(), for the same base model; K/V still predicted need the bundle that predicted
        them. `options` as for ChatSession() (the saved system message is kept)."""
        path = Path(path)
        check_session_path(path)
        if not path.is_file():
            raise KVPredError(f"session file not found: {path}")
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:  # noqa: BLE001  (safetensors/JSON errors of a corrupt file: one message)
            raise KVPredError(f"{path}: not a readable prompt-cache file ({e.__class__.__name__})") from None
        if meta.get("format") != SESSION_FORMAT:
            raise KVPredError(f"{path}: not a kvpred-mlx session (a prompt-cache file without session metadata)")
        if meta.get("format_version") != str(SESSION_VERSION):
            raise KVPredError(f"{path}: session format version {meta.get('format_version')}, this kvpred-mlx reads "
                              f"{SESSION_VERSION}")
        try:
            fields = {k: json.loads(meta[k]) for k in ("base", "tokens", "predicted_spans", "messages", "system",
                                                       "turns")}
            exact_until, repaired = int(meta["exact_until"]), int(meta["repaired_tokens"])
        except (KeyError, ValueError) as e:
            raise KVPredError(f"{path}: corrupt session metadata ({e.__class__.__name__}: {e})") from None
        saved, have = fields["base"], _base_identity(pipe)
        if (saved.get("config_hash"), saved.get("num_layers")) != (have["config_hash"], have["num_layers"]) or \
                not fingerprints_match(saved.get("fingerprint") or [], have["fingerprint"]):
            raise KVPredError(f"{path}: this session was made for another model ({fields['base'].get('reference')}),"
                              f" not {pipe.base.source}")
        tokens = fields["tokens"]
        _check_cache(path, pipe, cache, len(tokens))
        if exact_until < len(tokens) and fields["predicted_spans"] and meta.get("bundle") != bundle_id(pipe.bundle):
            raise KVPredError(f"{path}: this session holds K/V predicted by another KVP bundle (id "
                              f"{meta.get('bundle')}); load it with that bundle, or repair it before saving")
        session = cls(pipe, system=fields["system"], **options)
        session.messages, session.tokens, session.cache = fields["messages"], tokens, cache
        session.exact_until, session.repaired_tokens = exact_until, repaired
        session.predicted_spans = [tuple(span) for span in fields["predicted_spans"]]
        session.turns = [TurnStats(**t) for t in fields["turns"]]
        return session


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template over the whole conversation, with the assistant header after it."""
    if not getattr(tokenizer, "chat_template", None):
        raise KVPredError("chat sessions need a tokenizer with a chat template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def check_session_path(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise KVPredError(f"{path}: session files are mlx-lm prompt caches and end in .safetensors")


def _base_identity(pipe: Pipeline) -> dict:
    base = describe_base(pipe.base)
    return {k: base[k] for k in ("reference", "config_hash", "num_layers", "vocab_size", "fingerprint")}


def _check_cache(path: Path, pipe: Pipeline, cache: list, n_tokens: int) -> None:
    """The file's caches fit the base: one KVCache per layer, its K/V heads, as many positions as tokens."""
    layers = pipe.base.model.layers
    if len(cache) != len(layers) or not all(isinstance(c, KVCache) for c in cache):
        raise KVPredError(f"{path}: {len(cache)} caches for a {len(layers)}-layer model")
    for i, (c, layer) in enumerate(zip(cache, layers)):
        n_kv, head_dim = kv_heads(layer)
        if c.offset != n_tokens or (c.keys is not None and tuple(c.keys.shape[1::2]) != (n_kv, head_dim)):
            raise KVPredError(f"{path}: the cache of layer {i} does not fit this model or the session's tokens")
