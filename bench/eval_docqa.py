"""docqa: the use KV prediction exists for. A held-out document cut to N tokens, then a question about it, as one
user turn of the chat template; and, as a second row set, short chat instructions without a document. The base's
greedy answer (up to `answer_tokens`, chat stop tokens) is the reference. Per prompt length and mode: teacher-forced
top-1 agreement on the answer (with standard errors and paired differences), first-token agreement, greedy
exact-prefix length, the share of repeated 4-grams in greedy answers, and the NLL of the base's answer.

The documents come from files held out of every bundle's training (as `heldout`); the short instructions are a
fixed list no training data uses (selfdata.py writes instruction x topic prompts of another form, and asks
its own document questions).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_kvpred.evaluate import score_sequence
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import Pipeline, chat_prompt_ids, generate_tokens
from mlx_kvpred.selfdata import document_question, document_texts

from .metrics import agreement_prefix, cell, paired_difference, standard_error

QUESTIONS = (
    "What is the text above about?",
    "List the key points of the text above.",
    "Summarize the text above in one sentence.",
    "What does the text above say about {x}?",
    "What would come next after the end of this text?",
    "Rewrite the first paragraph of the text above in simpler words.",
    "Who or what is the text above mainly about?",
    "What is {x}, according to the text above?",
)
SHORT_PROMPTS = (
    "What is the capital of France?", "What is the chemical symbol for water?", "How many legs does a spider have?",
    "Name three primary colors.", "What is 12 times 12?", "Who wrote Romeo and Juliet?",
    "What planet is closest to the sun?", "Translate 'thank you' into Spanish.", "What is the boiling point of water?",
    "Give me a synonym for happy.", "What is the largest ocean on Earth?", "How many days are in a leap year?",
    "What gas do plants absorb from the air?", "Write a one-line greeting for a birthday card.",
    "What is the opposite of cold?", "Name a mammal that can fly.", "What language is spoken in Brazil?",
    "What is the square root of 81?", "Which continent is Egypt in?", "What do bees make?",
)


@dataclass
class ChatCase:
    prompt: np.ndarray  # token ids: the chat template's user turn and the assistant header
    length: str  # "256", "1024", ... (document tokens) or "short"
    question: str
    source: str  # the document's file, or "" for short instructions


def chat_ids(tokenizer, text: str) -> np.ndarray:
    return np.asarray(chat_prompt_ids(tokenizer, text), dtype=np.int32)


def document_cases(files: Sequence[str], tokenizer, *, lengths: Sequence[int], count: int,
                   seed: int = 0) -> list[ChatCase]:
    """Per length, `count` documents (the first N tokens of a held-out file long enough, seeded file order), each
    with a seeded question; a question naming "{x}" gets a name or number the document contains. Each length draws
    its questions from its own seed, so a length's cases do not depend on which other lengths are asked for."""
    if not getattr(tokenizer, "chat_template", None):
        raise KVPredError("--tasks docqa needs a model with a chat template")
    order = np.random.default_rng([seed, 23]).permutation(len(files))
    cases = []
    for n in lengths:
        docs = list(islice(document_texts(files, order, tokenizer, n), count))
        if not docs:
            raise KVPredError(f"--prompt-lengths {n}: no held-out document has {n} tokens")
        rng = np.random.default_rng([seed, 23, n])
        for source, doc in docs:
            question = document_question(doc, rng, QUESTIONS)
            cases.append(ChatCase(chat_ids(tokenizer, f"{doc}\n\n{question}"), str(n), question, source))
    return cases


def short_cases(tokenizer) -> list[ChatCase]:
    return [ChatCase(chat_ids(tokenizer, p), "short", p, "") for p in SHORT_PROMPTS]


def repeated_4gram_share(tokens: Sequence[int]) -> float:
    """The share of an answer's 4-grams that repeat an earlier one (0 for fewer than 5 tokens): loops score high."""
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def greedy_answer(pipe: Pipeline, prompt: np.ndarray, mode: str, n: int, eos: set[int], exact_tail: int = 1
                  ) -> list[int]:
    """Greedy tokens up to n, through the first EOS (included)."""
    out = []
    for token, _ in generate_tokens(pipe, mx.array(prompt), mode=mode, max_tokens=n, exact_tail=exact_tail):
        out.append(int(token))
        if token in eos:
            break
    return out


def _strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def run_docqa(specs: Sequence, cases: Sequence[ChatCase], *, answer_tokens: int, eos: set[int],
              advance: Callable[[], None]) -> dict[str, dict]:
    """{spec name: {length: metrics}} for the base spec (specs[0]) and every kvp and specprefill spec (aux specs are
    skipped)."""
    base_spec = specs[0]
    kvp_specs = [s for s in specs if s.mode in ("kvp", "specprefill")]
    per = {s.name: {} for s in [base_spec, *kvp_specs]}  # name -> length -> list of per-case dicts
    for case in cases:
        reference = greedy_answer(base_spec.pipe, case.prompt, "base", answer_tokens, eos)
        per[base_spec.name].setdefault(case.length, []).append(
            {"repeat4": repeated_4gram_share(_strip_eos(reference, eos))})
        tokens = mx.array(np.concatenate([case.prompt, np.asarray(reference, dtype=np.int32)]))
        base_scores = None  # the base's pass over the case, run once for all kvp specs
        for s in kvp_specs:
            r = score_sequence(s.pipe, tokens, case.prompt.size, with_aux=False, exact_tail=s.exact_tail,
                               base_scores=base_scores, mode=s.mode)
            base_scores = {k: r[k] for k in ("base_top1", "nll_base")}
            agree = r["kvp_top1"] == r["base_top1"]
            answer = greedy_answer(s.pipe, case.prompt, s.mode, answer_tokens, eos, s.exact_tail)
            per[s.name].setdefault(case.length, []).append({
                "agreement": float(agree.mean()), "first_token": float(agree[0]),
                "prefix": agreement_prefix(reference, answer, answer_tokens, eos),
                "repeat4": repeated_4gram_share(_strip_eos(answer, eos)),
                "nll_kvp": float(r["nll_kvp"].mean()), "nll_base": float(r["nll_base"].mean())})
        advance()
    out: dict[str, dict] = {}
    first = kvp_specs[0].name if kvp_specs else None
    for name, by_length in per.items():
        out[name] = {}
        for length, rows in by_length.items():
            m = {"cases": len(rows), "repeat4": float(np.mean([r["repeat4"] for r in rows]))}
            if "agreement" in rows[0]:
                agreements = [r["agreement"] for r in rows]
                m.update({"agreement": float(np.mean(agreements)), "agreement_se": standard_error(agreements),
                          "first_token_agreement": float(np.mean([r["first_token"] for r in rows])),
                          "mean_prefix": float(np.mean([r["prefix"] for r in rows])),
                          "nll_kvp": float(np.mean([r["nll_kvp"] for r in rows])),
                          "nll_base": float(np.mean([r["nll_base"] for r in rows])),
                          "case_agreement": agreements})
                if name != first:
                    m["vs_first_kvp"] = paired_difference(agreements, out[first][length]["case_agreement"])
            out[name][length] = m
    return out


def print_docqa_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    t = Table(title=f"docqa: held-out document + question in chat form, base's greedy answer ({s['answer_tokens']} "
                    f"tokens) as the reference; {s['docqa_docs']} documents per length, short: "
                    f"{len(SHORT_PROMPTS)} instructions")
    for c in ("mode", "prompt", "answer agree", "± se", "vs 1st kvp (paired)", "first-token agree",
              "greedy prefix", "repeated 4-grams", "NLL kvp / base", "TTFT GFLOP"):
        t.add_column(c, justify="right")
    for row in result["modes"]:
        for length, m in row.get("docqa", {}).items():
            vs = m.get("vs_first_kvp")
            nll = f"{m['nll_kvp']:.3f} / {m['nll_base']:.3f}" if "nll_kvp" in m else ""
            flops = row.get("docqa_flops", {}).get(length)
            t.add_row(row["name"], length, cell(m.get("agreement"), ".3f"), cell(m.get("agreement_se"), ".3f"),
                      f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs and vs["se"] is not None else "",
                      cell(m.get("first_token_agreement"), ".3f"), cell(m.get("mean_prefix"), ".1f"),
                      f"{m['repeat4']:.3f}", nll, f"{flops / 1e9:.3g}" if flops else "")
    (console or Console(width=max(Console().width, 200))).print(t)
