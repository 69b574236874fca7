"""One Pareto per prompt length: needle accuracy (and docqa agreement where run) against measured TTFT, from the
JSON of `kvpred-mlx eval --tasks needle[,docqa] --keep ... --exact-keep ...` runs and of one `kvpred-mlx bench
--modes base,kvp,kvp@F,specprefill@F --prompt-file FILE` run.

    python -m mlx_kvpred.bench.facts_pareto --bench bench.json --eval needle-1024.json [...] --plot facts.png
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


def print_markdown(rows: list[dict]) -> None:
    print("| prompt | mode | TTFT (s) | speedup | needle accuracy | of base | kvp - base (paired) | docqa agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["length"], -(r["ttft_s"] or 0))):
        vs = r["vs_base"]
        paired = f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs and vs["se"] is not None else ""
        print(f"| {r['length']} | {r['name']} | {_num(r['ttft_s'], '.2f')} | {_num(r['speedup'], '.2f')}x | "
              f"{r['accuracy']:.3f} ± {r['se']:.3f} | {_num(r['of_base'], '.2f')} | {paired} | "
              f"{_num(r['docqa_agreement'], '.3f')} |")


def _num(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def plot(rows: list[dict], path: str) -> None:
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    # one colour per method and option (kvp, kvp with each exact keep, specprefill per keep), the base black
    names = sorted({r["name"] for r in rows if r["mode"] != "base"})
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        here = [r for r in rows if r["length"] == n and r["ttft_s"] is not None]
        for r in here:
            ax.errorbar([r["ttft_s"]], [r["accuracy"]], yerr=[r["se"]], fmt="o", capsize=3,
                        color=COLORS["base"] if r["mode"] == "base" else colors[r["name"]], label=r["name"])
        pts = [(r["ttft_s"], r["accuracy"]) for r in here]
        front = pareto_front(pts)
        if len(front) > 1:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], ls="--", color="gray", lw=1)
        ax.set(title=f"needle, {n}-token prompts", xlabel="measured TTFT (s, median)", ylabel="needle accuracy",
               ylim=(-0.04, 1.04))
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
    parser.add_argument("--plot", help="PNG to write")
    args = parser.parse_args(argv)
    with open(args.bench) as f:
        bench = json.load(f)
    evals = []
    for path in args.eval:
        with open(path) as f:
            evals.append(json.load(f))
    rows = facts_table(bench, evals)
    print_markdown(rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
