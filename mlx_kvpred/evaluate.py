"""Teacher-forced accuracy of KV prediction on held-out text: agreement with the base's true-cache
predictions and NLL, for modes base / kvp / aux."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_lm.models.cache import make_prompt_cache

from .attention import lm_head_of
from .pipeline import Pipeline, predict_cache, prefill_logits, split_exact_tail


@dataclass
class HeldoutMetrics:
    sequences: int
    prompt_len: int
    cont_len: int
    agreement: float  # kvp top-1 == base top-1, over continuation positions
    first_token_agreement: float  # at the first generated position only
    nll_base: float  # mean NLL of the real continuation tokens
    nll_kvp: float
    nll_aux: float | None  # None when there is no aux LM head to run
    aux_agreement: float | None
    sequence_agreement: list[float]  # kvp agreement per sequence (for paired comparisons and standard errors)


def _nll(logits: mx.array, targets: mx.array) -> mx.array:
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


def score_sequence(pipe: Pipeline, tokens: mx.array, prompt_len: int, *, with_aux: bool = True,
                   exact_tail: int = 1, base_scores: dict | None = None, mode: str = "kvp") -> dict:
    """Logit comparisons on one sequence of prompt_len + cont_len tokens; positions are those predicting
    tokens[prompt_len:], i.e. the first output token and the teacher-forced continuation. kvp predicts the cache
    of all but the last `exact_tail` prompt tokens, which the base computes itself (as generate_tokens does).
    `base_scores` ("base_top1", "nll_base" of an earlier call on the same tokens) skips the base's own pass.
    `mode`: kvp, or specprefill (its scores are then under the kvp_ keys)."""
    prompt, cont = tokens[:prompt_len], tokens[prompt_len:]
    base = pipe.base.model
    out = {}
    if base_scores is None:  # base with its true cache: one pass over everything, the positions predicting cont
        base_logits = base(tokens[None, :-1])[0, prompt_len - 1:]
        out.update(base_top1=mx.argmax(base_logits, axis=-1), nll_base=_nll(base_logits, cont))
    # kvp: predicted cache for the prompt but its tail, then the base runs the tail and the continuation
    if lm_head_of(base) is not None:  # as generate_tokens prefills (exact_keep included), then the continuation
        cache, first = prefill_logits(pipe, prompt, mode=mode, exact_tail=exact_tail)
        kvp_logits = mx.concatenate([first, base(cont[None, :-1], cache=cache)[0]]) if cont.size > 1 else first
    else:
        predicted, exact = split_exact_tail(prompt, exact_tail)
        cache = predict_cache(pipe, predicted) if predicted.size else make_prompt_cache(base)
        kvp_logits = base(tokens[None, predicted.size:-1], cache=cache)[0, exact.size - 1:]
    out.update(kvp_top1=mx.argmax(kvp_logits, axis=-1), nll_kvp=_nll(kvp_logits, cont))
    if with_aux and pipe.bundle is not None:
        aux_logits = pipe.bundle.aux(tokens[None, :-1])[0, prompt_len - 1:]
        out["aux_top1"] = mx.argmax(aux_logits, axis=-1)
        out["nll_aux"] = _nll(aux_logits, cont)
    mx.eval(out)
    return {**(base_scores or {}), **{k: np.array(v) for k, v in out.items()}}


def evaluate_heldout(pipe: Pipeline, sequences: np.ndarray, *, prompt_len: int = 256, cont_len: int = 64,
                     with_aux: bool = True, exact_tail: int = 1, progress=None) -> HeldoutMetrics:
    """Mean metrics over `sequences` (n, >= prompt_len + cont_len) of held-out token ids."""
    if sequences.shape[1] < prompt_len + cont_len:
        raise ValueError(f"sequences have {sequences.shape[1]} tokens, need {prompt_len + cont_len}")
    rows = []
    for seq in sequences:
        rows.append(score_sequence(pipe, mx.array(seq[:prompt_len + cont_len]), prompt_len, with_aux=with_aux,
                                   exact_tail=exact_tail))
        if progress:
            progress()
    agree = np.stack([r["kvp_top1"] == r["base_top1"] for r in rows])
    has_aux = "aux_top1" in rows[0]
    return HeldoutMetrics(
        sequences=len(rows), prompt_len=prompt_len, cont_len=cont_len,
        agreement=float(agree.mean()), first_token_agreement=float(agree[:, 0].mean()),
        nll_base=float(np.mean([r["nll_base"].mean() for r in rows])),
        nll_kvp=float(np.mean([r["nll_kvp"].mean() for r in rows])),
        nll_aux=float(np.mean([r["nll_aux"].mean() for r in rows])) if has_aux else None,
        aux_agreement=float(np.mean([r["aux_top1"] == r["base_top1"] for r in rows])) if has_aux else None,
        sequence_agreement=[float(a) for a in agree.mean(axis=1)],
    )
