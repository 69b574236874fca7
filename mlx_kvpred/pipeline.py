"""Generation with KV prediction: the base computes the first `exact_head` prompt positions -> aux prefill of the
prompt but its last `exact_tail` tokens -> predicted base cache for the rest -> the base runs those last tokens for
the first output token -> mlx-lm's generate_step decodes with the base alone (exact_head 0 and exact_tail 1 are the
paper's condition; the CLI uses DEFAULT_EXACT_HEAD and DEFAULT_EXACT_TAIL).

Modes: "kvp" (the method), "base" (plain base prefill and decode), "aux" (the aux model alone, a baseline),
"specprefill" (SpecPrefill, arXiv 2502.02789: the base's first layers score the prompt's positions by the attention
its exact tail pays them, and the base prefills only the `keep` fraction that scores highest, at their own
positions), "auto" (kvp where it saves real time on this device, else base: policy.py). kvp's `exact_keep`: the base
recomputes the K/V of the predicted positions that score highest, attending to the predicted K/V of the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generate_step, generation_stream, wired_limit
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import policy
from .attention import (attention_of, backbone, embed, lm_head_of, run_blocks, runs_alone, sliding_window,
                        tap_kv, windows)
from .backends import Backend, for_device
from .bundle import Bundle, load_bundle, scorer_layers, shared_base_layers
from .cache import keep_window, session_cache, write_predicted_kv
from .errors import KVPredError
from .importance import DEFAULT_POOL, attention_scores, carry_forward, select_positions, tap_queries
from .loading import LoadedModel, default_device, load_model, set_device
from .policy import ModeChoice, PrefillRates
from .positions import compact_cache, recompute_at, rotated_at
from .predictor import KVPredictor

MODES = ("auto", "kvp", "base", "aux", "specprefill")
DEFAULT_BUNDLE_DIR = Path(__file__).parent / "bundles" / "smollm2-135m-instruct-lp12-facts"  # for the default model
# Prompt tokens the base computes itself in kvp mode, in stream_generate and the CLI (generate_tokens' default, 1,
# is the paper's condition): a chat question and the assistant header (measured: docs/training.md).
DEFAULT_EXACT_TAIL = 32
# Leading prompt positions the base computes itself in kvp mode: position 0 is the attention sink, whose K/V a
# per-token map predicts worst (docs/training.md). Position 0 attends only to itself, so its K/V depend on its token
# alone: cached per pipeline, free after first use.
DEFAULT_EXACT_HEAD = 1
HEAD_KV_ENTRIES = 64  # distinct heads Pipeline.head_kv keeps (first in, first out)
DEFAULT_KEEP = 0.3  # specprefill: the fraction of the prompt before its exact tail that the base prefills
DEFAULT_EXACT_KEEP = 0.0  # kvp: the fraction of predicted positions the base recomputes (docs/facts.md)


@dataclass
class Pipeline:
    """A base model, and the aux model + predictor of a KVP bundle (None: only mode "base" works), and the backend
    that runs them (None: the device's, backends.for_device), which prepares both models."""

    base: LoadedModel
    bundle: Bundle | None = None
    device: str = "cpu"
    prefill_rates: Any = None  # policy.PrefillRates for mode auto, measured on first use
    exact_head: int = DEFAULT_EXACT_HEAD  # kvp: the first N positions of a sequence get the base's own K/V
    head_kv: dict = field(default_factory=dict, repr=False)  # head tokens -> the base's K/V per layer (offset 0)
    backend: Backend | None = None
    keep: float = DEFAULT_KEEP  # specprefill: the fraction of positions before the exact tail the base prefills
    exact_keep: float = DEFAULT_EXACT_KEEP  # kvp: the fraction of predicted positions the base recomputes

    def __post_init__(self):
        if self.backend is None:
            self.backend = for_device(self.device)
        self.backend.prepare(self.base.model)
        if self.bundle is not None:
            self.backend.prepare(self.bundle.aux)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def model_id(self) -> str:
        """The name the server gives the base: a GGUF file's stem, else its source."""
        source = self.base.source
        return Path(source).stem if source.endswith(".gguf") else source

    @property
    def context_length(self) -> int | None:
        cfg = self.base.config
        return cfg.get("max_position_embeddings") or cfg.get("max_context_length") or cfg.get("context_length")


@dataclass
class KVPResponse(GenerationResponse):
    """mlx-lm's GenerationResponse plus the time to first token (s) and the mode that produced it."""

    ttft: float = 0.0
    mode: str = "kvp"
    reason: str = ""  # why this mode ran (mode auto: the policy's reason)


def shipped_bundle() -> Path | None:
    """The bundle shipped for the default model, if this install has it."""
    return DEFAULT_BUNDLE_DIR if (DEFAULT_BUNDLE_DIR / "kvp_config.json").is_file() else None


def load_pipeline(model: str | Path | None = None, *, kvp: str | Path | bool | None = None,
                  device: str | None = None, allow_untrained: bool = False,
                  exact_head: int | None = None, keep: float | None = None,
                  exact_keep: float | None = None) -> Pipeline:
    """Load once, generate many times. `model`: .gguf, mlx-lm dir or HF repo id (None: SmolLM2-135M-Instruct);
    `kvp`: a bundle dir; None: the shipped bundle when `model` is the default one; False: no bundle (mode base
    only). `device`: "cpu" or "gpu" (None: the GPU when MLX has one). `exact_head`: kvp's leading positions the
    base computes itself (None: DEFAULT_EXACT_HEAD); `keep`: specprefill's kept fraction (None: DEFAULT_KEEP);
    `exact_keep`: kvp's recomputed fraction (None: DEFAULT_EXACT_KEEP)."""
    keep = DEFAULT_KEEP if keep is None else check_fraction(keep, "keep")
    exact_keep = DEFAULT_EXACT_KEEP if exact_keep is None else check_fraction(exact_keep, "exact_keep")
    exact_head = DEFAULT_EXACT_HEAD if exact_head is None else check_exact_head(exact_head)
    device = set_device(device or default_device())
    if kvp is None:
        kvp = shipped_bundle() if model is None else False
    backend = for_device(device)
    base = load_model(model, device=device, backend=backend)
    bundle = load_bundle(kvp, base, allow_untrained=allow_untrained) if kvp is not False else None
    return Pipeline(base, bundle, device, exact_head=exact_head, backend=backend, keep=keep, exact_keep=exact_keep)


def check_exact_head(exact_head: int) -> int:
    if exact_head < 0:
        raise KVPredError(f"exact_head must be >= 0, got {exact_head}", "exact_head")
    return exact_head


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise KVPredError(f"mode must be auto, kvp, base, aux or specprefill, got {mode!r}", "mode")
    return mode


def choose_mode(pipe: Pipeline, mode: str, *, new_tokens: int, offset: int = 0, aux_lag: int = 0,
                exact_tail: int = 1, kvp_min_tokens: int | None = None,
                ttft_budget: float | None = None, exact_keep: float = 0.0) -> ModeChoice:
    """The mode that runs `new_tokens` after `offset` cached ones. "auto": base without a bundle, else the cost
    policy (policy.choose_auto, kvp recomputing the `exact_keep` fraction); kvp and aux need a bundle."""
    if check_mode(mode) == "auto":
        if pipe.bundle is None:
            return ModeChoice("base", "no KVP bundle")
        return policy.choose_auto(pipe, prefill_rates(pipe), new_tokens=new_tokens, offset=offset, aux_lag=aux_lag,
                                  exact_tail=exact_tail, kvp_min_tokens=kvp_min_tokens, ttft_budget=ttft_budget,
                                  exact_keep=exact_keep)
    if mode in ("kvp", "aux") and pipe.bundle is None:
        raise KVPredError(f"mode {mode!r} needs a KVP bundle (kvp: a bundle directory)", "mode", "kvp")
    return ModeChoice(mode, f"--mode {mode}")


def prefill_rates(pipe: Pipeline) -> PrefillRates:
    """Mode auto's measured prefill rates of this pipeline (policy.prefill_rates: cached on disk, else a probe of a
    few seconds through generate_tokens). Run it on the thread that generates: MLX streams belong to a thread."""
    return policy.prefill_rates(pipe, generation=generate_tokens)


def predict_cache(pipe: Pipeline, tokens: mx.array, *, prefill_step_size: int = 2048,
                  max_kv_size: int | None = None, cache: list[Any] | None = None,
                  aux_cache: list[Any] | None = None, skip: int = 0) -> list[Any]:
    """Run the aux over `tokens` (the prompt but its exact tail) and return the predicted base cache: one
    ordinary mlx-lm cache object per base layer. The aux LM head never runs. A session passes its own base `cache`
    and `aux_cache` to append to; the first `skip` tokens then only run through the aux (to catch it up: their
    base K/V are already cached), the rest get predicted K/V, but for positions below `pipe.exact_head`, which the
    base computes itself."""
    caches = make_prompt_cache(pipe.base.model, max_kv_size=max_kv_size) if cache is None else cache
    _predict_into(pipe, tokens, caches, aux_cache, skip=skip, tail=0, prefill_step_size=prefill_step_size)
    return caches


def predict_cache_with_tail(pipe: Pipeline, tokens: mx.array, exact_tail: int, *, prefill_step_size: int = 2048,
                            max_kv_size: int | None = None) -> tuple[list[Any], mx.array]:
    """predict_cache of all but the last `exact_tail` tokens, whose shared layers (shared_base_layers: a KVP-LP
    aux is base layers 0..k-1) run in the same aux pass: their K/V there are exact and cached, and the residual
    stream entering base layer k (1, exact_tail, d) is returned for the base to continue from (first_token_from),
    instead of a separate base pass re-reading the shared layers' weights for a few rows."""
    caches = make_prompt_cache(pipe.base.model, max_kv_size=max_kv_size)
    stream = _predict_into(pipe, tokens, caches, None, skip=0, tail=exact_tail, prefill_step_size=prefill_step_size)
    return caches, stream


def predict_cache_with_exact_keep(pipe: Pipeline, tokens: mx.array, exact_tail: int, exact_keep: float, *,
                                  prefill_step_size: int = 2048, max_kv_size: int | None = None
                                  ) -> tuple[list[Any], mx.array]:
    """predict_cache_with_tail, then the base recomputes the K/V of the `exact_keep` fraction of predicted positions
    that matter most to the exact tail (importance.py: the shared layers' attention from the tail, carried a few
    positions forward), from the first unshared layer on, each at its own position and attending to the predicted
    K/V of the rest (recompute_at).
    A sliding-window layer holds every position while they run (a recomputed row sees its own window), then only its
    window, as make_prompt_cache's RotatingKVCache would."""
    base = pipe.base.model
    sizes = windows(base)
    caches = session_cache(base) if any(sizes) else make_prompt_cache(base, max_kv_size=max_kv_size)
    stream = predict_span_with_exact_keep(pipe, tokens, caches, None, exact_tail=exact_tail, exact_keep=exact_keep,
                                          prefill_step_size=prefill_step_size)
    return [keep_window(c, size) if size else c for c, size in zip(caches, sizes)], stream


def predict_span_with_exact_keep(pipe: Pipeline, tokens: mx.array, caches: list[Any], aux_caches: list[Any] | None,
                                 *, exact_tail: int, exact_keep: float, skip: int = 0,
                                 prefill_step_size: int = 2048) -> mx.array:
    """KVP-LP: predicted K/V of tokens[skip:len - exact_tail] appended to `caches` (the aux first catching up on
    tokens[:skip], as predict_cache does), the exact tail through the shared layers, scoring the predicted positions
    by the attention it pays them there, and the `exact_keep` fraction of them recomputed by the base's other layers.
    Returns the tail's residual stream entering the first unshared layer (the base continues from it)."""
    bundle = _need_bundle(pipe)
    base = pipe.base.model
    sizes = windows(base)
    if any(size and not isinstance(c, KVCache) for c, size in zip(caches, sizes)):
        raise KVPredError("exact keep needs every position of a sliding-window layer cached (cache.session_cache)",
                          "exact_keep")
    shared = len(bundle.aux.layers)
    predicted, exact = split_exact_tail(tokens, exact_tail)
    start = caches[0].offset  # the position of tokens[skip]
    stream = _predict_into(pipe, predicted, caches, aux_caches, skip=skip, tail=0,
                           prefill_step_size=prefill_step_size, keep_stream=True)
    end = start + predicted.size - skip
    tail_stream, scores = _scored_tail(pipe, exact, caches, shared, end=end)
    first = first_predicted(pipe, start, end)  # positions before it are exact already
    kept = select_positions(carry_forward(scores[first:]), keep=exact_keep) + first
    if kept.size:
        with mx.stream(generation_stream):
            rows = stream[:, kept - (start - skip)]
            if pipe.backend.run_rows(base, caches[shared:], stream=rows, first_layer=shared, positions=kept) is None:
                recompute_at(base.layers[shared:], caches[shared:], rows, kept, end, sizes[shared:])
    return tail_stream


def decode_from_stream(pipe: Pipeline, tail: mx.array, caches: list[Any], stream: mx.array, *, max_tokens: int = 256,
                       sampler: Callable | None = None, logits_processors: Sequence[Callable] | None = None,
                       prefill_step_size: int = 2048, **step_kwargs) -> Generator[tuple[int, mx.array], None, None]:
    """KVP-LP: the base continues the exact `tail` from the first unshared layer, on `stream` (its residual stream
    there, from predict_span_with_exact_keep), then decodes as generate_tokens does."""
    base = pipe.base.model
    return _merged_first_step(tail, base, lm_head_of(base), caches, backend=pipe.backend, max_tokens=max_tokens,
                              sampler=sampler, logits_processors=logits_processors,
                              prefill_step_size=prefill_step_size, step_kwargs=step_kwargs,
                              first_layer=len(_need_bundle(pipe).aux.layers),
                              stream=stream)


def keeps_exact(pipe: Pipeline) -> bool:
    """Whether kvp takes the KVP-LP path here (the tail continuing from the aux's residual stream; exact_keep runs
    only there): a bundle whose aux is the base's first layers, and a plain LM head."""
    bundle = pipe.bundle
    return (bundle is not None and lm_head_of(pipe.base.model) is not None
            and shared_base_layers(bundle, pipe.base.model) == len(bundle.aux.layers) < len(pipe.base.model.layers))


def _check_full_attention(model: nn.Module, field: str) -> None:
    """SpecPrefill moves the kept positions back side by side (positions.compact_cache), which would move a
    sliding-window layer's window: not supported."""
    if any(sliding_window(model, layer) for layer in model.layers):
        raise KVPredError(f"mode specprefill does not support sliding-window attention "
                          f"({type(model).__module__.rsplit('.', 1)[-1]} models) yet; kvp's exact keep does", field)


def _first_layers(pipe: Pipeline, tokens: mx.array, caches: list[Any], k: int, *,
                  prefill_step_size: int) -> mx.array:
    """The base's first k layers over `tokens`, their K/V into `caches[:k]`: the residual stream entering layer k."""
    base = pipe.base.model
    streams = []
    with mx.stream(generation_stream):
        for start in range(0, tokens.size, prefill_step_size):
            chunk = tokens[None, start:start + prefill_step_size]
            stream = pipe.backend.run_rows(base, caches[:k], tokens=chunk, stop_layer=k)
            if stream is None:
                stream = run_blocks(base, embed(base, chunk), caches[:k], stop=k)
            mx.eval(stream, [c.state for c in caches[:k]])
            streams.append(stream)
    return mx.concatenate(streams, axis=1) if len(streams) > 1 else streams[0]


def _scored_tail(pipe: Pipeline, tail: mx.array, caches: list[Any], k: int, *, end: int) -> tuple[mx.array, mx.array]:
    """The exact tail through the base's first k layers, appended to `caches[:k]` (which hold the positions before
    it): (its residual stream entering layer k, the importance of positions 0..end-1 by the attention it pays them
    there: importance.attention_scores)."""
    base = pipe.base.model
    layers = base.layers[:k]
    with mx.stream(generation_stream):
        queries: list[mx.array] = []
        stream = pipe.backend.run_rows(base, caches[:k], tokens=tail[None], stop_layer=k, queries=queries)
        if stream is None:
            with tap_queries(layers) as taps:
                stream = run_blocks(base, embed(base, tail[None]), caches[:k], stop=k)
            queries = [q[-1] for q in taps]
        keys, sizes = [c.keys[:, :, :c.offset] for c in caches[:k]], windows(base)[:k]
        scores = pipe.backend.attention_scores(layers, queries, keys, end=end, pool=DEFAULT_POOL, windows=sizes)
        if scores is None:
            scores = attention_scores(layers, queries, keys, end=end, exp=pipe.backend.loss_ops()[0], windows=sizes)
        mx.eval(stream, scores, [c.state for c in caches[:k]])
    return stream, scores


def _specprefill_logits(pipe: Pipeline, prompt: mx.array, exact_tail: int, keep: float, *, prefill_step_size: int,
                        max_kv_size: int | None) -> tuple[list[Any], mx.array]:
    """SpecPrefill's prefill: the base's first k layers (scorer_layers) over the prompt, the importance of each
    position before the exact tail by the attention the tail pays it there, then the base's other layers over the
    kept positions and the tail only. The caches keep those positions alone (positions.compact_cache), so decoding
    continues at their offset. Returns (caches, the last position's logits)."""
    base = pipe.base.model
    head = lm_head_of(base)
    if head is None:
        raise KVPredError(f"mode specprefill does not support {type(base).__module__} models yet", "mode")
    _check_full_attention(base, "mode")
    k = scorer_layers(pipe.bundle, base)
    predicted, exact = split_exact_tail(prompt, exact_tail)
    end = predicted.size
    caches = make_prompt_cache(base, max_kv_size=max_kv_size)
    stream = _first_layers(pipe, predicted, caches, k, prefill_step_size=prefill_step_size)
    tail_stream, scores = _scored_tail(pipe, exact, caches, k, end=end)
    kept = select_positions(scores, keep=keep, always=range(min(pipe.exact_head, end)))
    shift = end - kept.size  # dropped positions: the kept ones move back by as many (positions.py)
    rows = mx.concatenate([kept, mx.arange(end, prompt.size, dtype=mx.int32)])
    with mx.stream(generation_stream):
        for layer, cache in zip(base.layers[:k], caches[:k]):
            compact_cache(cache, attention_of(layer).rope, rows, shift)
        kept_stream = mx.concatenate([stream[:, kept], tail_stream], axis=1)
        logits = pipe.backend.run_rows(base, caches[k:], stream=kept_stream, first_layer=k, rotate_at=rows - shift)
        if logits is None:
            with rotated_at(base.layers[k:], rows - shift):
                hidden = run_blocks(base, kept_stream, caches[k:], first=k)
            logits = head(backbone(base).norm(hidden[:, -1, :]))
        mx.eval(logits, [c.state for c in caches])
    return caches, logits


def _predict_into(pipe: Pipeline, tokens: mx.array, caches: list[Any], aux_caches: list[Any] | None, *, skip: int,
                  tail: int, prefill_step_size: int, keep_stream: bool = False) -> mx.array | None:
    """The aux over `tokens`: predicted K/V of tokens[skip:len - tail] into `caches` (the exact head the base's own),
    and with `tail`, the shared layers' K/V of the last `tail` tokens and their residual stream entering the first
    unshared base layer; `keep_stream`: that stream of every token (the aux must be base layers 0..k-1)."""
    bundle = _need_bundle(pipe)
    base_model = pipe.base.model
    # fresh caches: the shared layers' base caches become the aux's own (the same K/V, already RoPE'd) at the end
    take_aux = aux_caches is None and caches[0].offset == 0
    aux_caches = make_prompt_cache(bundle.aux) if aux_caches is None else aux_caches
    shared = shared_base_layers(bundle, base_model) if tail or keep_stream else 0
    take_aux = take_aux and shared > 0 and all(type(a) is type(c) for a, c in zip(aux_caches, caches[:shared]))
    if (tail or keep_stream) and shared != len(bundle.aux.layers):
        raise KVPredError("an exact tail in the aux's pass needs an aux of base layers 0..k-1 (shared_base_layers)")
    predicted_end = tokens.size - tail
    offset = caches[0].offset  # the position of tokens[skip]
    head = first_predicted(pipe, offset, offset + predicted_end - skip) - offset
    # the aux's blocks are the base's blocks 0..k-1 and their base K/V its caches': the backend may run chunks as
    # those blocks (run_rows), unless the predictor reads the aux's K/V, which only the aux's own pass records
    base_blocks = take_aux and shared == len(bundle.aux.layers) and (
        bundle.predictor.config.input == "hidden" or not bundle.predictor.linear_layers)
    if head > 0:  # held: the shared layers' buffers become the aux's, the others' grow (backend.predict_kv)
        write_exact_head(pipe, tokens[skip:skip + head], caches, hold=base_blocks)
        skip += head
    prev_hidden = None  # the aux hidden state before this chunk (for predictors reading the previous token)
    streams = []  # the tail's residual stream, per chunk
    norm = backbone(bundle.aux).norm  # applied here, so the stream before it can be kept
    with mx.stream(generation_stream), tap_kv(bundle.aux.layers) as record:
        for start in range(0, tokens.size, prefill_step_size):
            stop = min(start + prefill_step_size, tokens.size)
            chunk = tokens[None, start:stop]
            stream = pipe.backend.run_rows(base_model, aux_caches, tokens=chunk, stop_layer=shared) if base_blocks \
                else None
            if stream is None:
                stream = run_blocks(bundle.aux, embed(bundle.aux, chunk), aux_caches)
                keys = [calls.pop() for calls in record.keys]
                values = [calls.pop() for calls in record.values]
            else:  # not read: the predictor reads the hidden state, the shared layers' caches are the aux's
                keys = values = [None] * len(bundle.aux.layers)
            if keep_stream or (tail and stop > predicted_end):
                streams.append(stream if keep_stream else stream[:, max(predicted_end - start, 0):])
            hidden = norm(stream)
            drop = min(max(skip - start, 0), stop - start)  # positions of this chunk only catching up
            keep = min(max(predicted_end - start, 0), stop - start)  # ... and those before the tail
            if keep > drop:
                _write_predictions(pipe.backend, bundle.predictor, base_model, caches, shared, norm, stream, hidden,
                                   keys, values, prev_hidden, drop, keep, room=tokens.size - start - keep)
            if shared and stop - start > drop and not take_aux:  # the shared layers' exact K/V, the tail's included
                write_predicted_kv(base_model.layers[:shared], caches[:shared], [k[:, drop:] for k in keys],
                                   [v[:, drop:] for v in values], backend=pipe.backend)
            prev_hidden = hidden[:, -1:]
            mx.eval([c.state for c in caches], [c.state for c in aux_caches], streams)
    for c, a in zip(caches[:shared] if take_aux else [], aux_caches):
        c.state = a.state  # the exact head's K/V included: the aux computed the same layers at the same positions
    return mx.concatenate(streams, axis=1) if len(streams) > 1 else (streams[0] if streams else None)


def _write_predictions(backend: Backend, predictor: KVPredictor, base_model: nn.Module, caches: list[Any],
                       shared: int, norm: nn.Module, stream: mx.array, hidden: mx.array, keys: list[mx.array | None],
                       values: list[mx.array | None], prev_hidden: mx.array | None, drop: int, keep: int,
                       room: int) -> None:
    """The predicted K/V of a chunk's positions drop..keep - 1 appended to the caches of base layers shared.. (the
    exact layers' K/V the aux's own): `stream` the aux's residual streams of the chunk and `hidden` them normed,
    `keys` and `values` the aux's (None: not recorded), `prev_hidden` the normed stream before the chunk. The
    learned layers' by the backend where it can (backend.predict_kv, with `room` for the positions after)."""
    learned = predictor.linear_layers
    by_backend = bool(learned) and learned[0] >= shared and backend.predict_kv(
        predictor, norm, stream[:, drop:keep], hidden[:, drop - 1:drop] if drop else prev_hidden,
        [base_model.layers[i] for i in learned], [caches[i] for i in learned], room=room)
    if by_backend:  # what is left are the exact layers: the aux's K/V
        pred_k, pred_v = [keys[j] for j in predictor.config.layer_map], [values[j] for j in predictor.config.layer_map]
    else:
        pred_k, pred_v = predictor.predict_fused(_leading(keys, keep), _leading(values, keep), hidden[:, :keep],
                                                 prev_hidden)
    rest = [i for i in range(shared, len(caches)) if not (by_backend and i in learned)]
    write_predicted_kv([base_model.layers[i] for i in rest], [caches[i] for i in rest],
                       [pred_k[i][:, drop:keep] for i in rest], [pred_v[i][:, drop:keep] for i in rest],
                       backend=backend)


def _leading(arrays: list[mx.array | None], n: int) -> list[mx.array | None]:
    """Each (1, L, ...) array's first n positions; None (K/V not recorded) stays None."""
    return [None if a is None else a[:, :n] for a in arrays]


def first_predicted(pipe: Pipeline, start: int, end: int) -> int:
    """The first position of the span [start, end) whose K/V kvp predicts: those below `pipe.exact_head` are the
    base's own."""
    return max(start, min(pipe.exact_head, end))


def write_exact_head(pipe: Pipeline, tokens: mx.array, caches: list[Any], *, hold: bool = False) -> None:
    """The base's own K/V for `tokens` appended to `caches`. From offset 0 they depend on the tokens alone and are
    kept in `pipe.head_kv` (a chat template's first tokens are the same every time). `hold`: fresh KVCaches hold
    those kept arrays as they are, for a caller that replaces the buffers next anyway (a buffer of a whole step
    of positions, made and filled, would only be copied from)."""
    key = tuple(tokens.tolist()) if caches[0].offset == 0 else None
    if key is not None and key in pipe.head_kv:
        for c, (k, v) in zip(caches, pipe.head_kv[key]):
            if hold and type(c) is KVCache:
                c.state = k, v, k.shape[2]
            else:
                c.update_and_fetch(k, v)
        return
    start = caches[0].offset
    with mx.stream(generation_stream):
        backbone(pipe.base.model)(tokens[None], cache=caches)
        mx.eval([c.state for c in caches])
    if key is not None:
        if len(pipe.head_kv) >= HEAD_KV_ENTRIES:
            pipe.head_kv.pop(next(iter(pipe.head_kv)))
        pipe.head_kv[key] = [(mx.array(c.keys[..., start:c.offset, :]), mx.array(c.values[..., start:c.offset, :]))
                             for c in caches]
        mx.eval(pipe.head_kv[key])


def _need_bundle(pipe: Pipeline) -> Bundle:
    if pipe.bundle is None:
        raise KVPredError("modes 'kvp' and 'aux' need a KVP bundle (kvp: a bundle directory)", "kvp")
    return pipe.bundle


def _with_prefix(processors: Sequence[Callable] | None, prefix: mx.array) -> list[Callable] | None:
    """Logits processors see the whole prompt, although generate_step is only given its last token."""
    if not processors:
        return None
    return [lambda toks, logits, p=p: p(mx.concatenate([prefix, toks]), logits) for p in processors]


def prefill_logits(pipe: Pipeline, prompt: mx.array, *, mode: str, exact_tail: int = 1, keep: float | None = None,
                   exact_keep: float | None = None, prefill_step_size: int = 2048,
                   max_kv_size: int | None = None) -> tuple[list[Any], mx.array]:
    """The base's cache after `prompt` as `mode` (base, kvp or specprefill, with generate_tokens' options) fills it,
    and the last prompt position's logits: what generate_tokens decodes from (evaluate.score_sequence
    teacher-forces a continuation from it). Models without a plain LM head (lm_head_of) are not supported."""
    keep = pipe.keep if keep is None else check_fraction(keep, "keep")
    exact_keep = pipe.exact_keep if exact_keep is None else check_fraction(exact_keep, "exact_keep")
    base, head = pipe.base.model, lm_head_of(pipe.base.model)
    if head is None:
        raise KVPredError(f"{type(base).__module__} models have no plain LM head to prefill by mode {mode}", "mode")
    steps = dict(prefill_step_size=prefill_step_size)
    if mode == "specprefill" and prompt.size > exact_tail:
        return _specprefill_logits(pipe, prompt, exact_tail, keep, max_kv_size=max_kv_size, **steps)
    if mode in ("base", "specprefill"):  # specprefill of a prompt no longer than its tail: nothing to drop
        cache = make_prompt_cache(base, max_kv_size=max_kv_size)
        return cache, _prompt_logits(prompt, base, head, cache, backend=pipe.backend, **steps)
    if mode != "kvp":
        raise KVPredError(f"prefill_logits takes mode base, kvp or specprefill, got {mode!r}", "mode")
    bundle = _need_bundle(pipe)
    predicted, exact = split_exact_tail(prompt, exact_tail)
    if predicted.size and keeps_exact(pipe):
        # KVP-LP: the tail's first layers are the aux's; the base continues from its residual stream
        shared = len(bundle.aux.layers)
        if exact_keep > 0:
            cache, stream = predict_cache_with_exact_keep(pipe, prompt, exact.size, exact_keep,
                                                          max_kv_size=max_kv_size, **steps)
        else:
            cache, stream = predict_cache_with_tail(pipe, prompt, exact.size, max_kv_size=max_kv_size, **steps)
        return cache, _prompt_logits(exact, base, head, cache, backend=pipe.backend, first_layer=shared,
                                     stream=stream, **steps)
    if exact_keep > 0 and predicted.size:
        raise KVPredError("exact_keep needs a KVP-LP bundle (an aux of the base's first layers)", "exact_keep")
    if predicted.size == 0:  # nothing for the aux to prefill
        cache = make_prompt_cache(base, max_kv_size=max_kv_size)
    else:
        cache = predict_cache(pipe, predicted, max_kv_size=max_kv_size, **steps)
    return cache, _prompt_logits(exact, base, head, cache, backend=pipe.backend, **steps)


def generate_tokens(pipe: Pipeline, prompt: mx.array, *, mode: str = "auto", max_tokens: int = 256,
                    sampler: Callable | None = None, logits_processors: Sequence[Callable] | None = None,
                    max_kv_size: int | None = None, prefill_step_size: int = 2048, exact_tail: int = 1,
                    keep: float | None = None, exact_keep: float | None = None,
                    **step_kwargs) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) like mlx-lm's generate_step, for any mode. In kvp and specprefill modes the base
    computes the last `exact_tail` prompt tokens itself (>= 1), attending to the predicted (kvp) or kept
    (specprefill: the `keep` fraction) cache of the rest; kvp's `exact_keep`: the fraction of predicted positions
    the base recomputes (None: the pipeline's). Extra kwargs go to generate_step."""
    keep = pipe.keep if keep is None else check_fraction(keep, "keep")
    exact_keep = pipe.exact_keep if exact_keep is None else check_fraction(exact_keep, "exact_keep")
    mode = choose_mode(pipe, mode, new_tokens=prompt.size, exact_tail=exact_tail, exact_keep=exact_keep).mode
    common = dict(max_tokens=max_tokens, sampler=sampler, prefill_step_size=prefill_step_size, **step_kwargs)
    if mode == "aux":
        if not runs_alone(_need_bundle(pipe).aux):
            raise KVPredError(f"mode aux: this aux ({len(pipe.bundle.aux.layers)} {type(pipe.bundle.aux).__module__}"
                              " blocks) runs only inside kvp: mlx-lm's model needs its global layer", "mode")
        return prompt_then_decode(prompt, _need_bundle(pipe).aux, backend=pipe.backend,
                                  logits_processors=logits_processors, max_kv_size=max_kv_size, **common)
    if mode == "base":
        return prompt_then_decode(prompt, pipe.base.model, backend=pipe.backend, logits_processors=logits_processors,
                                  max_kv_size=max_kv_size, **common)
    if lm_head_of(pipe.base.model) is not None and step_kwargs.get("kv_bits") is None:
        return _decode_after_prefill(pipe, prompt, mode=mode, exact_tail=exact_tail, keep=keep, exact_keep=exact_keep,
                                     prefill_step_size=prefill_step_size, max_kv_size=max_kv_size,
                                     max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                                     step_kwargs=step_kwargs)
    if mode != "kvp" or exact_keep > 0:
        raise KVPredError(f"mode {mode} and exact_keep need a model with a plain LM head and unquantized K/V "
                          f"({type(pipe.base.model).__module__}, kv_bits {step_kwargs.get('kv_bits')})", "mode")
    predicted, exact = split_exact_tail(prompt, exact_tail)  # the generic path: generate_step over the tail
    cache = predict_cache(pipe, predicted, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size) \
        if predicted.size else make_prompt_cache(pipe.base.model, max_kv_size=max_kv_size)
    return prompt_then_decode(exact, pipe.base.model, backend=pipe.backend, prompt_cache=cache,
                              logits_processors=_with_prefix(logits_processors, predicted), **common)


def _decode_after_prefill(pipe: Pipeline, prompt: mx.array, *, mode: str, max_tokens: int, sampler,
                          logits_processors, step_kwargs, **options) -> Generator[tuple[int, mx.array], None, None]:
    """prefill_logits, then the first token and the base's decoding (run on first use, as generate_step does)."""
    cache, logits = prefill_logits(pipe, prompt, mode=mode, **options)
    yield from _first_then_decode(logits, prompt, pipe.base.model, cache, backend=pipe.backend,
                                  max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                                  step_kwargs=step_kwargs)


def prompt_then_decode(prompt: mx.array, model, *, backend: Backend, prompt_cache: list[Any] | None = None,
                       max_tokens: int = 256,
                       sampler: Callable | None = None, logits_processors: Sequence[Callable] | None = None,
                       prefill_step_size: int = 2048, max_kv_size: int | None = None,
                       **step_kwargs) -> Generator[tuple[int, mx.array], None, None]:
    """mlx-lm's generate_step, with the first token from the last prompt chunk's own pass: generate_step runs the
    prompt's last token as a pass of its own (a whole decode step of weight reads); here the last chunk's final
    position goes through the LM head (lm_head_of) and decoding continues with generate_step from that token, one
    step a token by `backend.decoder`. Architectures without a known plain head use generate_step as it is."""
    head = lm_head_of(model)
    if head is None or prompt.size < 2 or step_kwargs.get("kv_bits") is not None:
        return generate_step(prompt, model, prompt_cache=prompt_cache, max_tokens=max_tokens, sampler=sampler,
                             logits_processors=logits_processors, prefill_step_size=prefill_step_size,
                             max_kv_size=max_kv_size, **step_kwargs)
    cache = make_prompt_cache(model, max_kv_size=max_kv_size) if prompt_cache is None else prompt_cache
    return _merged_first_step(prompt, model, head, cache, backend=backend, max_tokens=max_tokens, sampler=sampler,
                              logits_processors=logits_processors, prefill_step_size=prefill_step_size,
                              step_kwargs=step_kwargs)


def _merged_first_step(prompt, model, head, cache, *, backend: Backend, max_tokens, sampler, logits_processors, prefill_step_size,
                       step_kwargs, first_layer: int = 0, stream: mx.array | None = None
                       ) -> Generator[tuple[int, mx.array], None, None]:
    """prompt_then_decode's body; with `stream` (the residual stream entering layer `first_layer` for all of
    `prompt`, whose earlier layers' K/V are cached), the prompt runs from that layer on, in one pass."""
    logits = _prompt_logits(prompt, model, head, cache, backend=backend, prefill_step_size=prefill_step_size,
                            first_layer=first_layer, stream=stream)
    stream = None  # not held while decoding (a slice of the stream holds the aux's whole chunk)
    yield from _first_then_decode(logits, prompt, model, cache, backend=backend, max_tokens=max_tokens,
                                  sampler=sampler, logits_processors=logits_processors, step_kwargs=step_kwargs)


def _prompt_logits(prompt: mx.array, model, head, cache: list[Any], *, backend: Backend, prefill_step_size: int,
                   first_layer: int = 0, stream: mx.array | None = None) -> mx.array:
    """`prompt` through `model` into `cache` (from layer `first_layer` on, given the `stream` entering it) and the
    last position's logits."""
    inner = backbone(model)
    with mx.stream(generation_stream):
        if stream is not None:
            logits = backend.run_rows(model, cache[first_layer:], stream=stream, first_layer=first_layer)
            if logits is None:
                hidden = run_blocks(model, stream, cache[first_layer:], first=first_layer)
                logits = head(inner.norm(hidden[:, -1, :]))
        else:
            starts = list(range(0, prompt.size, prefill_step_size))
            for start in starts[:-1]:
                inner(prompt[None, start:start + prefill_step_size], cache=cache)
                mx.eval([c.state for c in cache])
            last = prompt[None, starts[-1]:]  # the last chunk: by the backend where it can
            logits = backend.run_rows(model, cache, tokens=last)
            if logits is None:
                logits = head(inner(last, cache=cache)[:, -1, :])
    return logits


def _first_then_decode(logits: mx.array, prompt: mx.array, model, cache: list[Any], *, backend: Backend,
                       max_tokens: int, sampler, logits_processors, step_kwargs
                       ) -> Generator[tuple[int, mx.array], None, None]:
    """The first token from the last prompt position's `logits` (after `prompt`'s logits processors), then
    generate_step's decoding from it with the base alone."""
    with mx.stream(generation_stream):
        for processor in logits_processors or ():
            logits = processor(prompt, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = (sampler or (lambda x: mx.argmax(x, axis=-1)))(logprobs)
        mx.eval(y, logprobs)
    first, first_logprobs = y.item(), logprobs.squeeze(0)
    logits = logprobs = None
    yield first, first_logprobs
    if max_tokens == 1:
        return
    yield from generate_step(mx.array([first]), backend.decoder(model), prompt_cache=cache, max_tokens=max_tokens - 1,
                             sampler=sampler, logits_processors=_with_prefix(logits_processors, prompt),
                             **step_kwargs)


def check_fraction(value: float, field: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise KVPredError(f"{field} must be a fraction in 0..1, got {value}", field)
    return value


def split_exact_tail(prompt: mx.array, exact_tail: int) -> tuple[mx.array, mx.array]:
    """kvp: (the prompt tokens whose cache is predicted, the last `exact_tail` ones the base computes itself)."""
    if exact_tail < 1:
        raise KVPredError(f"exact_tail must be >= 1 (the base computes at least the last prompt token), "
                          f"got {exact_tail}", "exact_tail")
    cut = max(prompt.size - exact_tail, 0)
    return prompt[:cut], prompt[cut:]


def require_text(text: str, source: str = "prompt") -> str:
    """Refuse an empty or whitespace-only prompt, naming where it came from (a file, --text, stdin)."""
    if not text.strip():
        raise KVPredError(f"the prompt is empty ({source})")
    return text


def chat_prompt_ids(tokenizer, text: str, *, system: str | None = None) -> list[int]:
    """`text` as one user turn of the tokenizer's chat template, with the assistant header after it."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)  # transformers >= 5 may return a BatchEncoding


def encode_prompt(pipe: Pipeline, text: str, *, chat: bool = True, system: str | None = None) -> mx.array:
    """Tokenize `text`, as one user turn of the chat template when `chat` (and the tokenizer has one)."""
    require_text(text)
    tok = pipe.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = chat_prompt_ids(tok, text, system=system)
    else:
        ids = tok.encode(text, add_special_tokens=tok.bos_token is None or not text.startswith(tok.bos_token))
    return mx.array(ids)


def check_prompt(pipe: Pipeline, prompt: mx.array) -> None:
    if prompt.size == 0:
        raise KVPredError("the prompt has no tokens")
    limit = pipe.context_length
    if limit and prompt.size >= limit:
        raise KVPredError(f"the prompt has {prompt.size} tokens, the model's context is {limit}")


def stream_generate(pipe: Pipeline, prompt: str | Sequence[int] | mx.array, *, mode: str = "auto",
                    max_tokens: int = 256, chat: bool = True, system: str | None = None,
                    exact_tail: int = DEFAULT_EXACT_TAIL, kvp_min_tokens: int | None = None,
                    ttft_budget: float | None = None, **kwargs) -> Iterator[KVPResponse]:
    """Stream text segments (KVPResponse, mlx-lm's GenerationResponse + ttft and the mode that produced it) as they
    are produced. A str prompt is tokenized here, as a chat turn when `chat` (as `kvpred-mlx generate` does; False:
    raw text); token ids are used as given. kvp: the base computes the last `exact_tail` prompt tokens. auto:
    `kvp_min_tokens` and `ttft_budget` (s) tune the policy (choose_mode). kwargs go to generate_tokens."""
    if isinstance(prompt, str):
        prompt = encode_prompt(pipe, prompt, chat=chat, system=system)
    elif not isinstance(prompt, mx.array):
        prompt = mx.array(list(prompt))
    check_prompt(pipe, prompt)
    exact_keep = pipe.exact_keep if kwargs.get("exact_keep") is None else kwargs["exact_keep"]
    choice = choose_mode(pipe, mode, new_tokens=prompt.size, exact_tail=exact_tail, kvp_min_tokens=kvp_min_tokens,
                         ttft_budget=ttft_budget, exact_keep=exact_keep)
    tic = time.perf_counter()
    tokens = generate_tokens(pipe, prompt, mode=choice.mode, max_tokens=max_tokens, exact_tail=exact_tail, **kwargs)
    yield from stream_responses(pipe, tokens, prompt_tokens=prompt.size, max_tokens=max_tokens, mode=choice.mode,
                                reason=choice.reason, tic=tic)


def stream_responses(pipe: Pipeline, tokens: Iterator[tuple[int, mx.array]], *, prompt_tokens: int,
                     max_tokens: int, mode: str, reason: str = "", tic: float | None = None) -> Iterator[KVPResponse]:
    """(token, logprobs) from generate_tokens -> detokenized KVPResponses, one per token, the last with a
    finish_reason ("stop" at an EOS token, "length" at `max_tokens`). TTFT counts from `tic` (default: now)."""
    tokenizer = pipe.tokenizer
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    model = pipe.bundle.aux if mode == "aux" else pipe.base.model
    common = dict(prompt_tokens=prompt_tokens, mode=mode, reason=reason)
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter() if tic is None else tic
        ttft, token, logprobs, n = 0.0, 0, None, 0
        for n, (token, logprobs) in enumerate(tokens):
            if n == 0:
                ttft = time.perf_counter() - tic
                tic = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                yield _response(detokenizer, token, logprobs, ttft, n, tic, "stop", final=True, **common)
                return
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield _response(detokenizer, token, logprobs, ttft, n + 1, tic, None, **common)
        yield _response(detokenizer, token, logprobs, ttft, n + 1, tic, "length", final=True, **common)


def _response(detokenizer, token, logprobs, ttft, n_gen, tic, finish, final=False, *, prompt_tokens: int,
              mode: str, reason: str) -> KVPResponse:
    if final:
        detokenizer.finalize()
    elapsed = time.perf_counter() - tic
    return KVPResponse(text=detokenizer.last_segment, token=token, logprobs=logprobs, from_draft=False,
                       prompt_tokens=prompt_tokens, prompt_tps=prompt_tokens / ttft if ttft else 0.0,
                       generation_tokens=n_gen, generation_tps=(n_gen - 1) / elapsed if n_gen > 1 and elapsed else 0.0,
                       peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, ttft=ttft, mode=mode,
                       reason=reason)


def generate(pipe: Pipeline, prompt: str | Sequence[int] | mx.array, **kwargs) -> str:
    """The whole completion as one string (see stream_generate for the options)."""
    return "".join(r.text for r in stream_generate(pipe, prompt, **kwargs))
