"""Accuracy vs time to first token: the harness behind `kvpred-mlx eval`.

Modes: base, kvp (one per bundle), aux alone (one per bundle). Tasks:
- heldout:   mlx_kvpred.evaluate.evaluate_heldout (top-1 agreement with the base's true-cache predictions,
             first-token agreement, NLL), teacher-forced on held-out text.
- genagree:  greedy continuation of N tokens from held-out prompts; length of the exact-match prefix with
             base mode's continuation (the base's EOS ends the reference: matching through it is a full match).
- humaneval: greedy pass@1 on HumanEval (bench/eval_humaneval.py).
Cost per mode: analytical TTFT FLOPs at the eval prompt length (bench/flops.py, attention term included) and
measured TTFT (median over runs of generate_tokens to the first token, modes interleaved per run).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_kvpred.atomic import atomic_write
from mlx_kvpred.bundle import Bundle
from mlx_kvpred.data import collect_files, default_sources, split_files, tokenize_files
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.evaluate import evaluate_heldout
from mlx_kvpred.flops import ttft_flops
from mlx_kvpred.loading import LoadedModel
from mlx_kvpred.pipeline import DEFAULT_EXACT_HEAD, Pipeline, generate_tokens

from .eval_humaneval import DEFAULT_TIMEOUT, run_humaneval
from .metrics import agreement_prefix, cell, paired_difference, standard_error

TASKS = ("heldout", "genagree", "humaneval", "docqa", "needle")
SCHEMA = "kvpred-mlx-eval/1"
# The accuracy each task puts on the Pareto plot: (key in the task's dict, axis label).
ACCURACY = {"heldout": ("agreement", "held-out top-1 agreement with base"),
            "genagree": ("mean_prefix", "greedy exact-match prefix with base (mean tokens)"),
            "humaneval": ("pass_at_1", "HumanEval pass@1 (greedy)")}

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()


def parse_tasks(value: str) -> list[str]:
    tasks = [t.strip().lower() for t in value.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        what = f"unknown {', '.join(map(repr, bad))}" if bad else "no task given"
        raise KVPredError(f"--tasks: {what}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


@dataclass
class ModeSpec:
    name: str  # table/plot label: "base", "kvp", "aux", or "kvp (label, tail N)" with several bundles / tails
    mode: str  # base | kvp | aux
    bundle: str | None  # bundle label
    pipe: Pipeline
    exact_tail: int = 1  # kvp: prompt tokens the base computes itself, at the end (at the start: pipe.exact_head)


def spec_flops(spec: ModeSpec, base: LoadedModel, n: int) -> int:
    """Analytical TTFT FLOPs of a spec's mode and options for an n-token prompt."""
    return ttft_flops(spec.mode, base, spec.pipe.bundle, n, exact_tail=spec.exact_tail, keep=spec.pipe.keep,
                      exact_keep=spec.pipe.exact_keep)


def bundle_labels(paths: Sequence[str | Path]) -> list[str]:
    """Directory names, or full paths where names collide."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def mode_specs(base: LoadedModel, bundles: Sequence[tuple[str, Bundle]], *, with_aux: bool = True,
               exact_tails: Sequence[int] = (1,), exact_heads: Sequence[int] = (DEFAULT_EXACT_HEAD,),
               exact_keeps: Sequence[float] = (0.0,), keeps: Sequence[float] = ()) -> list[ModeSpec]:
    """base, then per bundle a kvp row per exact head, exact keep and tail, a specprefill row per keep (scored by
    the bundle's aux where it is the base's first layers; the first tail) and (with_aux) one aux row."""
    specs = [ModeSpec("base", "base", None, Pipeline(base, bundles[0][1] if bundles else None))]
    for label, bundle in bundles:
        for head in exact_heads:
            for exact_keep in exact_keeps:
                pipe = Pipeline(base, bundle, exact_head=head, exact_keep=exact_keep)
                for tail in exact_tails:
                    parts = ([label] if len(bundles) > 1 else []) \
                        + ([f"head {head}"] if len(exact_heads) > 1 else []) \
                        + ([f"exact keep {exact_keep:g}"] if exact_keep else []) \
                        + ([f"tail {tail}"] if len(exact_tails) > 1 else [])
                    specs.append(ModeSpec(f"kvp ({', '.join(parts)})" if parts else "kvp", "kvp", label, pipe, tail))
        for keep in keeps:
            parts = ([label] if len(bundles) > 1 else []) + [f"keep {keep:g}"]
            specs.append(ModeSpec(f"specprefill ({', '.join(parts)})", "specprefill", label,
                                  Pipeline(base, bundle, keep=keep), exact_tails[0]))
        if with_aux:
            specs.append(ModeSpec(f"aux ({label})" if len(bundles) > 1 else "aux", "aux", label, Pipeline(
                base, bundle)))
    return specs


def heldout_files(bundles: Sequence[Bundle], data: Sequence[str] | None) -> tuple[list[str], str]:
    """Files no bundle trained on, and where they came from: those held out from every bundle's training run (as
    the bundles record them), or else the held-out side of the by-file split of `data` (default: the default
    training sources)."""
    recorded = None
    for b in bundles:
        files = b.config.training.get("data", {}).get("heldout_files", [])
        recorded = files if recorded is None else [f for f in recorded if f in set(files)]
    recorded = [f for f in recorded or [] if Path(f).is_file()]
    if data is None and recorded:
        return recorded, f"{len(recorded)} held-out files recorded in the bundle(s)"
    sources = list(data) if data else default_sources()
    split = split_files(collect_files(sources))
    if not split.heldout_files:
        raise KVPredError("--data: too few files for a held-out split (need ~10+)")
    return split.heldout_files, f"held-out split of {', '.join(sources)} ({len(split.heldout_files)} files)"


def heldout_sequences(bundles: Sequence[Bundle], tokenizer, *, data: Sequence[str] | None, seq_len: int,
                      count: int) -> tuple[np.ndarray, str]:
    """Held-out token sequences, one per file of `heldout_files`, and where they came from."""
    files, source = heldout_files(bundles, data)
    return tokenize_files(files, tokenizer, seq_len=seq_len, max_sequences=count, per_file=1), source


def eval_inputs(tokenizer, bundles: Sequence[Bundle], *, tasks: Sequence[str], data: Sequence[str] | None,
                prompt_len: int, cont_len: int, sequences: int, heldout_lengths: Sequence[int],
                problems: int | None, docqa_lengths: Sequence[int] | None, docs: int, needles: int = 40) -> dict:
    """What run_eval reads for `tasks`, from files no bundle trained on: `sequences` held-out sequences of
    prompt_len + cont_len tokens (heldout, genagree) and as many per extra length in `heldout_lengths`, the first
    `problems` HumanEval problems (None: all), `docs` documents per length of `docqa_lengths` plus the short chat
    instructions (docqa), `needles` needle cases per length of `docqa_lengths` (needle)."""
    from .eval_docqa import document_cases, short_cases
    from .eval_needle import needle_cases
    from .eval_humaneval import load_problems

    out = {"sequences": None, "heldout_source": None, "heldout_by_length": None, "problems": None, "docqa_cases": None,
           "needle_cases": None}
    if "heldout" in tasks or "genagree" in tasks:
        seqs, out["heldout_source"] = heldout_sequences(bundles, tokenizer, data=data, seq_len=prompt_len + cont_len,
                                                        count=sequences)
        out["sequences"] = seqs
        out["heldout_by_length"] = {n: heldout_sequences(bundles, tokenizer, data=data, seq_len=n + cont_len,
                                                         count=len(seqs))[0] for n in heldout_lengths}
    if "humaneval" in tasks:
        out["problems"] = load_problems(problems)
    if "docqa" in tasks:
        files, _ = heldout_files(bundles, data)
        out["docqa_cases"] = (document_cases(files, tokenizer, lengths=docqa_lengths, count=docs)
                              + short_cases(tokenizer))
    if "needle" in tasks:
        files, _ = heldout_files(bundles, data)
        out["needle_cases"] = needle_cases(files, tokenizer, lengths=docqa_lengths, count=needles)
    return out


# ---- genagree ---------------------------------------------------------------------------------------------

def greedy(pipe: Pipeline, prompt: mx.array, mode: str, n: int, exact_tail: int = 1) -> list[int]:
    return [t for t, _ in generate_tokens(pipe, prompt, mode=mode, max_tokens=n, exact_tail=exact_tail)]


def summarize_prefixes(prefixes: list[int], n: int) -> dict:
    return {"tokens": n, "mean_prefix": float(np.mean(prefixes)), "median_prefix": float(np.median(prefixes)),
            "full_match_rate": float(np.mean([p == n for p in prefixes])), "prefixes": [int(p) for p in prefixes]}


# ---- cost ---------------------------------------------------------------------------------------------------

def time_first_token(pipe: Pipeline, mode: str, prompt: mx.array, exact_tail: int = 1) -> float:
    """Seconds from the call to the first token (evaluated), as `kvpred-mlx bench` measures TTFT."""
    mx.clear_cache()
    tic = time.perf_counter()
    gen = generate_tokens(pipe, prompt, mode=mode, max_tokens=1, exact_tail=exact_tail)
    next(gen)
    elapsed = time.perf_counter() - tic
    gen.close()
    return elapsed


# ---- the run --------------------------------------------------------------------------------------------------

def _noop(_desc: str, _total: int) -> Callable[[], None]:
    return lambda: None


def run_eval(base: LoadedModel, bundles: Sequence[tuple[str, Bundle]], *, tasks: Sequence[str],
             sequences: np.ndarray | None = None, prompt_len: int = 256, cont_len: int = 64, gen_tokens: int = 64,
             problems: list[dict] | None = None, max_tokens: int = 256, humaneval_timeout: float = DEFAULT_TIMEOUT,
             with_aux: bool = True, ttft_repeats: int = 3, ttft_warmup: int = 1, progress: Progress | None = None,
             seed: int = 0, exact_tails: Sequence[int] = (1,), exact_heads: Sequence[int] = (DEFAULT_EXACT_HEAD,),
             exact_keeps: Sequence[float] = (0.0,), keeps: Sequence[float] = (),
             docqa_cases: Sequence | None = None, needle_cases: Sequence | None = None,
             answer_tokens: int = 64, heldout_by_length: dict[int, np.ndarray] | None = None) -> dict:
    """Every task for every mode, plus TTFT cost; returns the JSON-ready result (schema SCHEMA). kvp modes run once
    per exact head and tail; docqa scores `docqa_cases` (eval_docqa.document_cases / short_cases); `heldout_by_length`
    ({prompt length: sequences of it + cont_len tokens}) adds heldout's agreement at each of those lengths."""
    progress = progress or _noop
    if not bundles:
        raise KVPredError("eval needs at least one KVP bundle (--kvp DIR)")
    tasks = parse_tasks(",".join(tasks))
    if ("heldout" in tasks or "genagree" in tasks) and sequences is None:
        raise KVPredError("tasks heldout/genagree need held-out sequences")
    if "humaneval" in tasks and not problems:
        raise KVPredError("task humaneval needs HumanEval problems")
    if "docqa" in tasks and not docqa_cases:
        raise KVPredError("task docqa needs chat cases (documents and questions)")
    if "needle" in tasks and not needle_cases:
        raise KVPredError("task needle needs needle cases (eval_needle.needle_cases)")
    limit = Pipeline(base).context_length
    if limit and prompt_len + max(cont_len, gen_tokens) > limit:
        raise KVPredError(f"--prompt-len {prompt_len} + continuation does not fit the model's context ({limit})")
    if sequences is not None and sequences.shape[1] < prompt_len + cont_len:
        raise KVPredError(f"held-out sequences have {sequences.shape[1]} tokens, need {prompt_len + cont_len}")
    specs = mode_specs(base, bundles, with_aux=with_aux, exact_tails=exact_tails, exact_heads=exact_heads,
                       exact_keeps=exact_keeps, keeps=keeps)
    rows = {s.name: {"name": s.name, "mode": s.mode, "bundle": s.bundle} for s in specs}
    eos = set(getattr(base.tokenizer, "eos_token_ids", None) or []) if base.tokenizer is not None else set()

    # cost: analytical FLOPs and measured TTFT at the eval prompt length, modes interleaved per run
    if sequences is not None:
        ttft_prompt = mx.array(sequences[0][:prompt_len])
    else:
        ttft_prompt = mx.array(np.random.default_rng(seed).integers(0, base.config["vocab_size"], prompt_len)
                               .astype(np.int32))
    times = {s.name: [] for s in specs}
    advance = progress("TTFT", len(specs) * (ttft_repeats + ttft_warmup))
    for r in range(ttft_warmup + ttft_repeats):
        for s in specs:
            t = time_first_token(s.pipe, s.mode, ttft_prompt, s.exact_tail)
            if r >= ttft_warmup:
                times[s.name].append(t)
            advance()
    for s in specs:
        row = rows[s.name]
        row["ttft_flops"] = spec_flops(s, base, prompt_len)
        row["exact_tail"] = s.exact_tail if s.mode == "kvp" else None
        row["exact_head"] = s.pipe.exact_head if s.mode == "kvp" else None
        row["exact_keep"] = s.pipe.exact_keep if s.mode == "kvp" else None
        row["keep"] = s.pipe.keep if s.mode == "specprefill" else None
        row["ttft_s"] = statistics.median(times[s.name])
        row["ttft_all"] = times[s.name]

    if "heldout" in tasks:
        advance = progress("held-out", sum(s.mode == "kvp" for s in specs) * len(sequences))
        for i, (label, bundle) in enumerate(bundles):
            kvp_specs = [s for s in specs if s.bundle == label and s.mode == "kvp"]
            aux = next((s for s in specs if s.bundle == label and s.mode == "aux"), None)
            for k, spec in enumerate(kvp_specs):  # one pass per exact head and tail; the first also scores the aux alone
                m = evaluate_heldout(spec.pipe, sequences, prompt_len=prompt_len, cont_len=cont_len,
                                     with_aux=with_aux and k == 0, exact_tail=spec.exact_tail, progress=advance)
                if i == 0 and k == 0:
                    rows["base"]["heldout"] = {"agreement": 1.0, "first_token_agreement": 1.0, "nll": m.nll_base}
                rows[spec.name]["heldout"] = {"agreement": m.agreement, "first_token_agreement":
                                              m.first_token_agreement, "nll": m.nll_kvp,
                                              "agreement_se": standard_error(m.sequence_agreement),
                                              "sequence_agreement": m.sequence_agreement}
                if aux is not None and k == 0:
                    rows[aux.name]["heldout"] = {"agreement": m.aux_agreement, "first_token_agreement": None,
                                                 "nll": m.nll_aux}

        kvp_rows = [rows[s.name]["heldout"] for s in specs if s.mode == "kvp"]
        for h in kvp_rows[1:]:
            h["vs_first_kvp"] = paired_difference(h["sequence_agreement"], kvp_rows[0]["sequence_agreement"])

    if "heldout" in tasks and heldout_by_length:
        kvp_specs = [s for s in specs if s.mode == "kvp"]
        advance = progress("held-out by length", len(kvp_specs) * sum(map(len, heldout_by_length.values())))
        for n, seqs in heldout_by_length.items():
            for s in kvp_specs:
                m = evaluate_heldout(s.pipe, seqs, prompt_len=n, cont_len=cont_len, with_aux=False,
                                     exact_tail=s.exact_tail, progress=advance)
                rows["base"].setdefault("heldout_lengths", {})[str(n)] = {"nll": m.nll_base, "sequences": len(seqs)}
                h = {"agreement": m.agreement, "agreement_se": standard_error(m.sequence_agreement),
                     "first_token_agreement": m.first_token_agreement, "nll": m.nll_kvp,
                     "sequence_agreement": m.sequence_agreement, "sequences": len(seqs)}
                if s is not kvp_specs[0]:
                    first = rows[kvp_specs[0].name]["heldout_lengths"][str(n)]
                    h["vs_first_kvp"] = paired_difference(h["sequence_agreement"], first["sequence_agreement"])
                rows[s.name].setdefault("heldout_lengths", {})[str(n)] = h

    if "genagree" in tasks:
        prompts = [mx.array(seq[:prompt_len]) for seq in sequences]
        advance = progress("genagree", len(specs) * len(prompts))
        base_spec = specs[0]
        reference = []
        for p in prompts:
            reference.append(greedy(base_spec.pipe, p, "base", gen_tokens))
            advance()
        rows["base"]["genagree"] = summarize_prefixes([gen_tokens] * len(prompts), gen_tokens)
        for s in specs[1:]:
            prefixes = []
            for p, ref in zip(prompts, reference):
                prefixes.append(agreement_prefix(ref, greedy(s.pipe, p, s.mode, gen_tokens, s.exact_tail), gen_tokens,
                                                 eos))
                advance()
            rows[s.name]["genagree"] = summarize_prefixes(prefixes, gen_tokens)

    if "humaneval" in tasks:
        advance = progress("HumanEval", len(specs) * len(problems))
        for s in specs:
            rows[s.name]["humaneval"] = run_humaneval(s.pipe, problems, mode=s.mode, max_tokens=max_tokens,
                                                      timeout=humaneval_timeout, progress=advance,
                                                      exact_tail=s.exact_tail)

    if "docqa" in tasks:
        from .eval_docqa import run_docqa

        advance = progress("docqa", len(docqa_cases))
        for name, by_length in run_docqa(specs, docqa_cases, answer_tokens=answer_tokens, eos=eos,
                                         advance=advance).items():
            rows[name]["docqa"] = by_length
        lengths = dict.fromkeys(c.length for c in docqa_cases)
        for s in specs:  # analytical TTFT per docqa prompt length (the cases' mean prompt tokens)
            if "docqa" in rows[s.name]:
                rows[s.name]["docqa_flops"] = {n: spec_flops(s, base, int(np.mean(
                    [c.prompt.size for c in docqa_cases if c.length == n]))) for n in lengths}

    if "needle" in tasks:
        from .eval_needle import run_needle

        advance = progress("needle", len(needle_cases))
        for name, by_length in run_needle(specs, needle_cases, eos=eos, advance=advance).items():
            rows[name]["needle"] = by_length
        for s in specs:  # analytical TTFT per needle prompt length (the cases' mean prompt tokens)
            rows[s.name]["needle_flops"] = {n: spec_flops(s, base, int(np.mean(
                [c.prompt.size for c in needle_cases if c.length == n])))
                for n in dict.fromkeys(c.length for c in needle_cases)}

    base_row = rows["base"]
    for row in rows.values():
        row["speedup_analytical"] = base_row["ttft_flops"] / row["ttft_flops"]
        row["speedup_measured"] = base_row["ttft_s"] / row["ttft_s"]
    from .run import environment

    env = environment(specs[0].pipe)
    env.pop("bundle", None)
    env.pop("bundle_trained", None)
    return {
        "schema": SCHEMA,
        "environment": env,
        "settings": {"tasks": list(tasks), "prompt_len": prompt_len, "cont_len": cont_len,
                     "heldout_sequences": 0 if sequences is None else int(len(sequences)),
                     "gen_tokens": gen_tokens, "humaneval_problems": len(problems or []),
                     "humaneval_max_tokens": max_tokens, "humaneval_timeout_s": humaneval_timeout,
                     "ttft_repeats": ttft_repeats, "ttft_warmup": ttft_warmup, "ttft_prompt_tokens": prompt_len,
                     "ttft_prompt": "held-out text" if sequences is not None else "random tokens",
                     "exact_tails": list(exact_tails), "exact_heads": list(exact_heads), "answer_tokens": answer_tokens,
                     "docqa_docs": max([sum(c.length == n for c in docqa_cases) for n in
                                        {c.length for c in docqa_cases if c.length != "short"}] or [0])
                     if docqa_cases else 0,
                     "needle_cases": max([sum(c.length == n for c in needle_cases) for n in
                                          {c.length for c in needle_cases}] or [0]) if needle_cases else 0},
        "bundles": [{"label": label, "path": str(b.path) if b.path else None, "trained": b.config.trained,
                     "aux_kind": b.config.aux_kind, "aux_layers": b.config.aux_layers,
                     "steps": b.config.training.get("steps_done")} for label, b in bundles],
        "modes": list(rows.values()),
    }


# ---- output ---------------------------------------------------------------------------------------------------

def write_json(result: dict, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))


def print_table(result: dict, console=None) -> None:
    """One row per mode. The first two columns stay mode | held-out top-1 agreement when heldout is run."""
    from rich.console import Console
    from rich.table import Table

    tasks = result["settings"]["tasks"]
    s = result["settings"]
    parts = []
    if "heldout" in tasks:
        parts.append(f"held-out {s['heldout_sequences']} x ({s['prompt_len']}+{s['cont_len']})")
    if "genagree" in tasks:
        parts.append(f"greedy agreement {s['heldout_sequences']} x {s['gen_tokens']} tokens")
    if "humaneval" in tasks:
        parts.append(f"HumanEval {s['humaneval_problems']} problems")
    labels = ", ".join(b["path"] or b["label"] for b in result["bundles"])
    t = Table(title=f"eval: {'; '.join(parts)}; TTFT at {s['prompt_len']} tokens, median of {s['ttft_repeats']} "
                    f"- {labels}")
    cols = ["mode"]
    paired = "heldout" in tasks and any("vs_first_kvp" in row.get("heldout", {}) for row in result["modes"])
    if "heldout" in tasks:
        cols += ["top-1 agree", "± se"] + (["vs 1st kvp (paired)"] if paired else []) + ["first-token agree", "NLL"]
    if "genagree" in tasks:
        cols += ["prefix mean", "prefix median", "full match"]
    if "humaneval" in tasks:
        cols += ["HumanEval pass@1"]
    cols += ["TTFT GFLOP", "TTFT ms", "speedup FLOPs", "speedup meas."]
    for c in cols:
        t.add_column(c, justify="right")
    for row in result["modes"]:
        cells = [row["name"]]
        if "heldout" in tasks:
            h = row.get("heldout", {})
            cells += [cell(h.get("agreement"), ".3f"), cell(h.get("agreement_se"), ".3f")]
            if paired:
                vs = h.get("vs_first_kvp")
                cells += [f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs and vs["se"] is not None else ""]
            cells += [cell(h.get("first_token_agreement"), ".3f"), cell(h.get("nll"), ".3f")]
        if "genagree" in tasks:
            g = row.get("genagree", {})
            cells += [cell(g.get("mean_prefix"), ".1f"), cell(g.get("median_prefix"), ".1f"),
                      cell(g.get("full_match_rate"), ".2f")]
        if "humaneval" in tasks:
            h = row.get("humaneval")
            cells += [f"{h['pass_at_1']:.3f} ({h['passed']}/{h['problems']})" if h else ""]
        cells += [f"{row['ttft_flops'] / 1e9:.3g}", f"{row['ttft_s'] * 1e3:.0f}",
                  f"{row['speedup_analytical']:.2f}x", f"{row['speedup_measured']:.2f}x"]
        t.add_row(*cells)
    (console or Console(width=max(Console().width, 200))).print(t)
    if any("heldout_lengths" in row for row in result["modes"]):
        print_heldout_lengths(result, console)
    if "docqa" in tasks:
        from .eval_docqa import print_docqa_table

        print_docqa_table(result, console)
    if "needle" in tasks:
        from .eval_needle import print_needle_table

        print_needle_table(result, console)


def print_heldout_lengths(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"held-out raw text by prompt length (+ {result['settings']['cont_len']} scored tokens)")
    for c in ("mode", "prompt", "sequences", "top-1 agree", "± se", "vs 1st kvp (paired)", "first-token agree",
              "NLL"):
        t.add_column(c, justify="right")
    for row in result["modes"]:
        for n, h in row.get("heldout_lengths", {}).items():
            vs = h.get("vs_first_kvp")
            t.add_row(row["name"], n, str(h["sequences"]), cell(h.get("agreement"), ".3f"),
                      cell(h.get("agreement_se"), ".3f"),
                      f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs and vs["se"] is not None else "",
                      cell(h.get("first_token_agreement"), ".3f"), f"{h['nll']:.3f}")
    (console or Console(width=max(Console().width, 200))).print(t)


def summary(result: dict) -> dict:
    """{mode name: {task: accuracy}} - the numbers on the Pareto plot."""
    return {row["name"]: {task: row[task][key] for task, (key, _) in ACCURACY.items() if task in row}
            for row in result["modes"]}

