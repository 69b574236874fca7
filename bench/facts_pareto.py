"""One Pareto per prompt length: needle accuracy and docqa answer agreement against measured TTFT, from the JSON
of `kvpred-mlx eval --tasks needle --keep ... --exact-keep ...` runs, of `eval --tasks docqa` runs, and of one
`kvpred-mlx bench --modes base,kvp,kvp@F,specprefill@F --prompt-file FILE` run.

    python -m mlx_kvpred.bench.facts_pareto --bench bench.json --eval needle.json [...] [--docqa docqa.json
        --bundle LABEL] --plot facts.png
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from .pareto import COLORS, check_matplotlib, pareto_front


def bench_mode(row: dict) -> str:
    """The bench mode that times an eval row's mode and options (kvp@F, specprefill@F)."""
    if row["mode"] == "kvp" and row.get("exact_keep"):
        return f"kvp@{row['exact_keep']:g}"
    if row["mode"] == "specprefill":
        return f"specprefill@{row['keep']:g}"
    return row["mode"]


def facts_table(bench: dict, evals: Sequence[dict]) -> list[dict]:
    """Per eval row and needle length: accuracy (± se, paired vs base), docqa agreement, and the bench's median TTFT
    and measured speedup at that length."""
    ttft = {(r["mode"], r["prompt_tokens"]): r for r in bench["rows"]}
    out = []
    for result in evals:
        for row in result["modes"]:
            for length, m in row.get("needle", {}).items():
                timed = ttft.get((bench_mode(row), int(length)), {})
                docqa = row.get("docqa", {}).get(length, {})
                out.append({"name": row["name"], "mode": row["mode"], "length": int(length),
                            "accuracy": m["accuracy"], "se": m["accuracy_se"], "of_base": m.get("of_base"),
                            "vs_base": m.get("vs_base"), "docqa_agreement": docqa.get("agreement"),
                            "ttft_s": timed.get("ttft_median"), "speedup": timed.get("speedup_measured")})
    return out


def docqa_table(bench: dict, evals: Sequence[dict], *, bundle: str | None = None) -> list[dict]:
    """Per eval row and document length: docqa answer agreement (± se, paired vs the eval's first kvp row) and the
    bench's median TTFT at that length; rows of `bundle` only (its label in the eval) where given. The base is the
    reference: agreement 1."""
    ttft = {(r["mode"], r["prompt_tokens"]): r for r in bench["rows"]}
    out = []
    for result in evals:
        for row in result["modes"]:
            if row["mode"] not in ("base", "kvp", "specprefill"):
                continue  # the aux alone is not scored on docqa
            if bundle and row["mode"] != "base" and row.get("bundle") != bundle:
                continue
            for length, m in row.get("docqa", {}).items():
                if length == "short":
                    continue
                if row["mode"] == "base":  # the reference answers are the base's
                    m = {"agreement": 1.0, "agreement_se": 0.0}
                timed = ttft.get((bench_mode(row), int(length)), {})
                out.append({"name": row["name"], "mode": row["mode"], "length": int(length),
                            "accuracy": m["agreement"], "se": m["agreement_se"], "vs_first_kvp": m.get("vs_first_kvp"),
                            "ttft_s": timed.get("ttft_median"), "speedup": timed.get("speedup_measured")})
    return out


def print_markdown(rows: list[dict], *, task: str = "needle") -> None:
    """The needle table (with each row's docqa agreement where the same eval ran it), or with task "docqa" the docqa
    one; by length, slowest first."""
    needle = task == "needle"
    extra = (["needle accuracy", "of base", "kvp - base (paired)", "docqa agreement"] if needle
             else ["docqa answer agreement", "vs first kvp (paired)"])
    header = ["prompt", "mode", "TTFT (s)", "speedup", *extra]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in sorted(rows, key=lambda r: (r["length"], -(r["ttft_s"] or 0))):
        cells = [str(r["length"]), r["name"], _num(r["ttft_s"], ".2f"), f"{_num(r['speedup'], '.2f')}x",
                 f"{r['accuracy']:.3f} ± {r['se']:.3f}"]
        if needle:
            cells += [_num(r["of_base"], ".2f"), _paired(r["vs_base"]), _num(r["docqa_agreement"], ".3f")]
        else:
            cells.append(_paired(r["vs_first_kvp"]))
        print("| " + " | ".join(cells) + " |")


def _paired(vs: dict | None) -> str:
    return f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs and vs["se"] is not None else ""


def _num(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def plot(rows: list[dict], path: str, docqa_rows: Sequence[dict] = ()) -> None:
    """A panel per prompt length: needle accuracy against measured TTFT; below, docqa agreement where given."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    panels = [("needle", rows, "needle accuracy", (-0.04, 1.04))]
    if docqa_rows:
        panels.append(("docqa", docqa_rows, "docqa answer agreement (of base)", (0.6, 1.02)))
    fig, axes = plt.subplots(len(panels), len(lengths), figsize=(5.2 * len(lengths), 4.2 * len(panels)),
                             squeeze=False)
    for (task, task_rows, ylabel, ylim), ax_row in zip(panels, axes):
        # one colour per method and option (kvp, kvp with each exact keep, specprefill per keep), the base black
        names = sorted({r["name"] for r in task_rows if r["mode"] != "base"})
        colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
        for ax, n in zip(ax_row, lengths):
            here = [r for r in task_rows if r["length"] == n and r["ttft_s"] is not None]
            for r in here:
                ax.errorbar([r["ttft_s"]], [r["accuracy"]], yerr=[r["se"]], fmt="o", capsize=3,
                            color=COLORS["base"] if r["mode"] == "base" else colors[r["name"]], label=r["name"])
            pts = [(r["ttft_s"], r["accuracy"]) for r in here]
            front = pareto_front(pts)
            if len(front) > 1:
                ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], ls="--", color="gray", lw=1)
            ax.set(title=f"{task}, {n}-token prompts", xlabel="measured TTFT (s, median)", ylabel=ylabel, ylim=ylim)
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="JSON of one kvpred-mlx bench run")
    parser.add_argument("--eval", nargs="+", required=True, help="JSON of kvpred-mlx eval runs with task needle")
    parser.add_argument("--docqa", nargs="*", default=[], help="JSON of kvpred-mlx eval runs with task docqa")
    parser.add_argument("--bundle", help="docqa: the rows of this bundle label only (an eval of several bundles)")
    parser.add_argument("--plot", help="PNG to write")
    args = parser.parse_args(argv)

    def load(path: str) -> dict:
        with open(path) as f:
            return json.load(f)

    bench = load(args.bench)
    rows = facts_table(bench, [load(p) for p in args.eval])
    print_markdown(rows)
    docqa_rows = docqa_table(bench, [load(p) for p in args.docqa], bundle=args.bundle)
    if docqa_rows:
        print()
        print_markdown(docqa_rows, task="docqa")
    if args.plot:
        plot(rows, args.plot, docqa_rows)


if __name__ == "__main__":
    main()
