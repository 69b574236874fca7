"""Conversations: a chat whose first turn holds a long document, then short questions.

- TTFT of each turn in a ChatSession (the cached prefix reused) against a cold base prefill of the same history.
- repair() of a first turn run by KV prediction, timed against a base prefill of as many tokens.
- Quality of a later turn: with the first turn predicted (repaired or not), teacher-forced top-1 agreement with the
  base's own answer to the same history.
"""

from __future__ import annotations

import statistics
import time
from itertools import islice
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import DEFAULT_EXACT_TAIL, Pipeline, choose_mode, generate_tokens
from mlx_kvpred.selfdata import document_texts
from mlx_kvpred.session import ChatSession, common_prefix, conversation_ids

from .eval_docqa import short_cases
from .eval_harness import heldout_files
from .metrics import paired_difference

QUESTIONS = ("What is this document about?", "What does it say first?", "Which names or numbers does it mention?")


def heldout_documents(pipe: Pipeline, doc_tokens: int, count: int, *, flag: str = "--docs") -> list[str]:
    """The first `count` held-out files (no bundle trained on them) that have `doc_tokens` tokens, cut to that many,
    as text; `flag` names the option to change in the error when there are fewer."""
    files, source = heldout_files([pipe.bundle] if pipe.bundle else [], None)
    docs = document_texts(files, iter(range(len(files))), pipe.tokenizer, doc_tokens)
    texts = [text for _, text in islice(docs, count)]
    if len(texts) < count:
        raise KVPredError(f"{flag}: only {len(texts)} held-out documents of {doc_tokens} tokens, {count} needed "
                          f"({source})")
    return texts


def _ttft_of_prompt(pipe: Pipeline, prompt: list[int]) -> float:
    tic = time.perf_counter()
    next(iter(generate_tokens(pipe, mx.array(prompt), mode="base", max_tokens=1)))
    return time.perf_counter() - tic


def time_conversation(pipe: Pipeline, document: str, *, questions: Sequence[str] = QUESTIONS,
                      answer_tokens: int = 32, repeats: int = 3, progress: Callable[[], None] | None = None) -> dict:
    """Per turn, the session's TTFT (mode base, the cached prefix reused) and a cold base prefill of the same
    history, interleaved; then repair() of a kvp first turn and a base prefill of the tokens it recomputes."""
    turns: list[dict] = [{"turn": i + 1, "session": [], "cold": []} for i in range(len(questions))]
    repair = {"repair": [], "prefill": [], "tokens": 0}
    for _ in range(repeats):
        session = ChatSession(pipe, mode="base")
        for i, question in enumerate(questions):
            session.send(document + "\n\n" + question if i == 0 else question, max_tokens=answer_tokens)
            stats = session.turns[-1]
            prompt = conversation_ids(pipe.tokenizer, session.messages[:-1])
            turns[i]["session"].append(stats.ttft)
            turns[i]["cold"].append(_ttft_of_prompt(pipe, prompt))
            turns[i].update(history_tokens=stats.prompt_tokens, cached_tokens=stats.cached_tokens)
            if progress:
                progress()
        kvp = ChatSession(pipe, mode="kvp")
        kvp.send(document + "\n\n" + questions[0], max_tokens=answer_tokens)
        tokens = list(kvp.tokens)
        tic = time.perf_counter()
        repair["tokens"] = kvp.repair()
        repair["repair"].append(time.perf_counter() - tic)
        repair["prefill"].append(_ttft_of_prompt(pipe, tokens[:repair["tokens"]]))
        if progress:
            progress()
    for t in turns:
        t["session_ttft"], t["cold_ttft"] = statistics.median(t["session"]), statistics.median(t["cold"])
        t["speedup"] = t["cold_ttft"] / t["session_ttft"]
    repair["repair_s"], repair["prefill_s"] = statistics.median(repair["repair"]), statistics.median(repair["prefill"])
    repair["ratio"] = repair["repair_s"] / repair["prefill_s"]
    return {"turns": turns, "repair": repair}


def score_later_turn(pipe: Pipeline, documents: Sequence[str], *, questions: Sequence[str] = QUESTIONS[:2],
                     answer_tokens: int = 32, progress: Callable[[], None] | None = None) -> dict:
    """Turn 1 (document + question) predicted; turn 2's answer teacher-forced against the base's greedy answer to
    the same history (the base's turn-1 answer in both), with and without repair() between the turns."""
    rows: dict[str, list[float]] = {"kvp, not repaired": [], "kvp, repaired": []}
    first_token: dict[str, list[float]] = {k: [] for k in rows}
    for document in documents:
        messages = [{"role": "user", "content": document + "\n\n" + questions[0]}]
        prompt1 = conversation_ids(pipe.tokenizer, messages)
        answer1 = pipe.tokenizer.decode(_greedy(pipe, prompt1, answer_tokens))
        messages += [{"role": "assistant", "content": answer1}, {"role": "user", "content": questions[1]}]
        prompt2 = conversation_ids(pipe.tokenizer, messages)
        reference = _greedy(pipe, prompt2, answer_tokens)
        for name in rows:
            session = ChatSession(pipe, mode="kvp")
            list(session.stream_tokens(prompt1, max_tokens=1))
            if name == "kvp, repaired":
                session.repair()
            agree = _forced_agreement(pipe, session, prompt2, reference)
            rows[name].append(float(agree.mean()))
            first_token[name].append(float(agree[0]))
        if progress:
            progress()
    out = {}
    for name, scores in rows.items():
        out[name] = {"agreement": float(np.mean(scores)), "se": float(np.std(scores, ddof=1) / np.sqrt(len(scores)))
                     if len(scores) > 1 else float("nan"), "first_token": float(np.mean(first_token[name])),
                     "n": len(scores)}
    out["kvp, repaired"]["vs_not_repaired"] = paired_difference(rows["kvp, repaired"], rows["kvp, not repaired"])
    return out


def auto_on_short_prompts(pipe: Pipeline, *, answer_tokens: int = 32) -> dict:
    """docqa's held-out short instructions: the mode auto picks for each, and whether its greedy answer equals the
    base's where it picks the base."""
    picked, equal = [], 0
    for case in short_cases(pipe.tokenizer):
        prompt = case.prompt.tolist()
        choice = choose_mode(pipe, "auto", new_tokens=len(prompt), exact_tail=DEFAULT_EXACT_TAIL)
        picked.append(choice.mode)
        if choice.mode == "base":
            auto = [t for t, _ in generate_tokens(pipe, mx.array(prompt), mode="auto", max_tokens=answer_tokens,
                                                  exact_tail=DEFAULT_EXACT_TAIL)]
            equal += auto == [t for t, _ in generate_tokens(pipe, mx.array(prompt), mode="base",
                                                            max_tokens=answer_tokens)]
    return {"prompts": len(picked), "base": picked.count("base"), "equal_to_base": equal,
            "kvp_min_tokens": choice.kvp_min_tokens}


def _greedy(pipe: Pipeline, prompt: list[int], n: int) -> list[int]:
    out = []
    for token, _ in generate_tokens(pipe, mx.array(prompt), mode="base", max_tokens=n):
        if token in pipe.tokenizer.eos_token_ids:
            break
        out.append(token)
    return out or [next(iter(pipe.tokenizer.eos_token_ids))]


def _forced_agreement(pipe: Pipeline, session: ChatSession, prompt: list[int], answer: list[int]) -> np.ndarray:
    """Per answer token: is it the base's top-1 given the session's cache for the shared prefix and the rest run
    by the base?"""
    common = common_prefix(session.tokens, prompt[:-1])
    trim_prompt_cache(session.cache, session.cache[0].offset - common)
    full = prompt + answer
    logits = pipe.base.model(mx.array(full[common:-1])[None], cache=session.cache)[0]
    predicted = np.array(mx.argmax(logits[len(prompt) - 1 - common:], axis=-1))
    return predicted == np.array(answer)


def print_conversation(timing: dict, quality: dict, auto: dict, *, doc_tokens: int, repeats: int) -> None:
    """time_conversation's turns and repair, score_later_turn's agreement and auto_on_short_prompts' picks."""
    print(f"conversation: a {doc_tokens}-token held-out document in turn 1, then short questions; "
          f"median of {repeats}")
    print(f"{'turn':>4} {'history':>8} {'cached':>7} {'session TTFT ms':>16} {'cold base TTFT ms':>18} {'speedup':>8}")
    for t in timing["turns"]:
        print(f"{t['turn']:>4} {t['history_tokens']:>8} {t['cached_tokens']:>7} {t['session_ttft'] * 1e3:>16.0f} "
              f"{t['cold_ttft'] * 1e3:>18.0f} {t['speedup']:>7.2f}x")
    r = timing["repair"]
    print(f"repair of {r['tokens']} tokens: {r['repair_s'] * 1e3:.0f} ms; base prefill of them "
          f"{r['prefill_s'] * 1e3:.0f} ms (ratio {r['ratio']:.2f})")
    for name, row in quality.items():
        diff = row.get("vs_not_repaired")
        print(f"turn-2 agreement with the base, {name}: {row['agreement']:.3f} ± {row['se']:.3f} (first token "
              f"{row['first_token']:.2f}, n={row['n']})" + (f"; paired vs not repaired {diff['diff']:+.3f} ± "
                                                            f"{diff['se']:.3f}" if diff else ""))
    print(f"auto on {auto['prompts']} held-out short instructions (--kvp-min-tokens {auto['kvp_min_tokens']}): "
          f"base picked for {auto['base']}, answers equal to the base's for {auto['equal_to_base']} of them")
