"""needle: whether a fact stated once in a long prompt comes back (RULER-style key-value retrieval).

The haystack is held-out prose (.rst, .md and .txt files no bundle trained on, in a seeded order, joined as RULER
joins essays) cut so that the whole chat prompt is about N tokens; one sentence giving a 4-digit number for a named
thing ("the silver kettle") is put at a depth in 0.05-0.95 of it, and a question in the same user turn asks for that
number. Program code is left out: it sends a 135M model into writing code instead of answering. Kinds: "single" (one needle) and "multi" (three needles for
three things; the question asks for one, the other two are distractors). The needle and the question each come in
several phrasings, plain ones: a needle phrased like program code sends a 135M model into writing code. An answer is
correct when the number appears in the greedy answer. Per mode and length: accuracy, its standard error, and the
paired difference from the base on the same cases. Each length draws its cases from its own seeded generator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_kvpred.data import read_text
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import chat_prompt_ids, generate_tokens
from mlx_kvpred.selfdata import insert_sentence

from .metrics import cell, paired_difference, standard_error

COLORS = ("red", "blue", "green", "yellow", "silver", "purple", "orange", "brown", "white", "black", "golden", "gray")
THINGS = ("kettle", "van", "lamp", "bicycle", "garden gate", "piano", "boat", "suitcase", "clock", "tent", "locker",
          "mailbox", "tractor", "umbrella", "guitar", "barn")
NEEDLES = ("The number of the {thing} is {value}.", "Remember this: the {thing} has the number {value}.",
           "By the way, the {thing} was given the number {value}.")
QUESTIONS = ("What is the number of the {thing}? Answer with the number.",
             "The text above gives a number for the {thing}. Which number is it?",
             "Somewhere above, the {thing} gets a number. What is that number?")
# A pretrained model (no chat template) gets the question as text to complete, the answer's start written out.
COMPLETIONS = ("Question: What is the number of the {thing}?\nAnswer: The number of the {thing} is",
               "Q: Which number was the {thing} given in the text above?\nA: The {thing} was given the number",
               "According to the text above, the number of the {thing} is")
KINDS = ("single", "multi")
ANSWER_TOKENS = 24
COMPLETION_ANSWER_TOKENS = 12  # the completion form's prompt ends where the number starts (Gemma: a token a digit)
PROSE = (".rst", ".md", ".txt")


@dataclass
class NeedleCase:
    prompt: np.ndarray  # token ids: the chat template's user turn (document with needles, question), assistant header;
    # or, in the completion form, the document and the question to complete
    length: int  # the prompt length asked for
    kind: str  # "single" or "multi"
    value: str  # the number the answer must contain
    depth: float  # where the asked-for needle stands in the document (0..1)
    source: str  # the haystack's first file
    answer_tokens: int = ANSWER_TOKENS  # greedy tokens generated for the answer


def haystack(files: Sequence[str], order: Iterator[int], tokenizer, n: int) -> tuple[str, str] | None:
    """(first file, text of n tokens) joining the next whole prose files of `order` (blank lines between; `order`
    is used up, so no file is in two haystacks); None when the files run out."""
    parts, tokens = [], 0
    for i in order:
        text = read_text(files[i]).strip()
        if not text:
            continue
        parts.append((files[i], text))
        tokens += len(tokenizer.encode(text, add_special_tokens=False))
        if tokens >= n:
            ids = tokenizer.encode("\n\n".join(t for _, t in parts), add_special_tokens=False)
            return parts[0][0], tokenizer.decode(ids[:n]).strip()
    return None


def needle_cases(files: Sequence[str], tokenizer, *, lengths: Sequence[int], count: int, seed: int = 0
                 ) -> list[NeedleCase]:
    """`count` cases per length (half single, half multi), each on its own held-out document, from a generator seeded
    by (seed, length): a length's cases do not depend on which other lengths are asked for."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    prose = [f for f in files if f.endswith(PROSE)]
    cases = []
    for n in lengths:
        rng = np.random.default_rng([seed, 31, n])
        order = iter(rng.permutation(len(prose)))
        template = len(chat_prompt_ids(tokenizer, "x")) if chat else len(tokenizer.encode("x"))
        for i in range(count):
            kind = KINDS[i % 2]
            overhead = template + (3 if kind == "multi" else 1) * 17 + 18  # the needles and the question
            found_hay = haystack(prose, order, tokenizer, max(n - overhead, 16))
            if found_hay is None:
                raise KVPredError(f"--prompt-lengths {n}: held-out prose fills only {i} haystacks of {n} tokens")
            source, doc = found_hay
            picks = rng.choice(len(COLORS) * len(THINGS), size=3 if kind == "multi" else 1, replace=False)
            things = [f"{COLORS[p // len(THINGS)]} {THINGS[p % len(THINGS)]}" for p in picks]
            values = [str(v) for v in rng.choice(np.arange(1000, 10000), size=len(things), replace=False)]
            depths = sorted(rng.uniform(0.05, 0.95, size=len(things)))
            for thing, value, depth in reversed(list(zip(things, values, depths))):  # the deepest first: positions hold
                doc = insert_sentence(doc, NEEDLES[rng.integers(len(NEEDLES))].format(thing=thing, value=value), depth)
            target = int(rng.integers(len(things)))
            question = (QUESTIONS if chat else COMPLETIONS)[rng.integers(len(QUESTIONS))].format(thing=things[target])
            text = f"{doc}\n\n{question}"
            ids = np.asarray(chat_prompt_ids(tokenizer, text) if chat else tokenizer.encode(text), dtype=np.int32)
            cases.append(NeedleCase(ids, n, kind, values[target], float(depths[target]), source,
                                    ANSWER_TOKENS if chat else COMPLETION_ANSWER_TOKENS))
    return cases


def found(pipe, case: NeedleCase, mode: str, tokenizer, eos: set[int], exact_tail: int) -> tuple[bool, str]:
    """(the number is in the greedy answer, the answer)."""
    out = []
    for token, _ in generate_tokens(pipe, mx.array(case.prompt), mode=mode, max_tokens=case.answer_tokens,
                                    exact_tail=exact_tail):
        if int(token) in eos:
            break
        out.append(int(token))
    answer = tokenizer.decode(out)
    return re.search(rf"(?<!\d){case.value}(?!\d)", answer.replace(",", "")) is not None, answer


def run_needle(specs: Sequence, cases: Sequence[NeedleCase], *, eos: set[int], advance: Callable[[], None]
               ) -> dict[str, dict]:
    """{spec name: {length: metrics}} for every spec (base, kvp per exact head and tail, aux), each case asked of
    every spec in turn."""
    correct = {s.name: {} for s in specs}
    answers = {s.name: {} for s in specs}
    for case in cases:
        for s in specs:
            ok, answer = found(s.pipe, case, s.mode, s.pipe.tokenizer, eos, s.exact_tail)
            correct[s.name].setdefault(case.length, []).append(float(ok))
            answers[s.name].setdefault(case.length, []).append(answer)
        advance()
    base = specs[0].name
    out = {}
    for s in specs:
        out[s.name] = {}
        for length, hits in correct[s.name].items():
            kinds = [c.kind for c in cases if c.length == length]
            m = {"cases": len(hits), "accuracy": float(np.mean(hits)), "accuracy_se": standard_error(hits),
                 "by_kind": {k: float(np.mean([h for h, kk in zip(hits, kinds) if kk == k])) for k in KINDS},
                 "case_correct": hits, "answers": answers[s.name][length]}
            if s.name != base:
                m["vs_base"] = paired_difference(hits, correct[base][length])
                base_acc = float(np.mean(correct[base][length]))
                m["of_base"] = m["accuracy"] / base_acc if base_acc else None
            out[s.name][length] = m
    return out


def print_needle_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"needle: a 4-digit number stated once in a held-out document, asked for after it (a chat turn, or "
                    f"a question to complete for models without a chat template); "
                    f"{result['settings']['needle_cases']} cases per length (single and multi-needle), greedy")
    for c in ("mode", "prompt", "accuracy", "± se", "single", "multi", "vs base (paired)", "of base"):
        t.add_column(c, justify="right")
    for row in result["modes"]:
        for length, m in row.get("needle", {}).items():
            vs = m.get("vs_base")
            t.add_row(row["name"], str(length), cell(m["accuracy"], ".3f"), cell(m["accuracy_se"], ".3f"),
                      cell(m["by_kind"]["single"], ".2f"), cell(m["by_kind"]["multi"], ".2f"),
                      f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs and vs["se"] is not None else "",
                      cell(m.get("of_base"), ".2f"))
    (console or Console(width=max(Console().width, 160))).print(t)
