"""Pareto plots of accuracy vs time-to-first-token cost (as in the KV Prediction paper's figures): one row per
task, columns analytical TTFT FLOPs and measured TTFT; one point per mode/bundle; the frontier drawn. docqa adds a
row per prompt length: answer agreement and first-token agreement against that length's TTFT FLOPs."""

from __future__ import annotations

from typing import Sequence

from mlx_kvpred.errors import KVPredError

from .eval_harness import ACCURACY

COLORS = {"base": "black", "kvp": "tab:blue", "aux": "tab:orange"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]  # one per bundle


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher or equal accuracy, one
    strictly), ordered by cost."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KVPredError("--plot needs matplotlib: pip install 'kvpred-mlx[bench]'") from None


def docqa_lengths(result: dict) -> list[str]:
    """The document lengths docqa ran, shortest first ("short" instructions are no length)."""
    found = {n for m in result["modes"] for n in m.get("docqa", {}) if n != "short"}
    return sorted(found, key=int)


def plot_pareto(result: dict, path: str) -> None:
    """Write the PNG: rows = tasks run (columns TTFT GFLOPs, measured TTFT s), then one row per docqa length
    (columns answer agreement, first-token agreement, both against that length's TTFT GFLOPs)."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in result["settings"]["tasks"] if t in ACCURACY]
    lengths = docqa_lengths(result)
    modes = result["modes"]
    fig, axes = plt.subplots(len(tasks) + len(lengths), 2, figsize=(11, 3.8 * (len(tasks) + len(lengths))),
                             squeeze=False)
    bundles = list(dict.fromkeys(m["bundle"] for m in modes if m["bundle"]))

    def panel(ax, rows: list[dict], pts: list[tuple[float, float]], xlabel: str, ylabel: str, top: float = 1.0):
        for m, (x, y) in zip(rows, pts):  # named in the legend: labels next to close points overlap
            marker = MARKERS[bundles.index(m["bundle"]) % len(MARKERS)] if m["bundle"] else "*"
            ax.scatter([x], [y], color=COLORS.get(m["mode"], "gray"), marker=marker, s=70 if m["bundle"] else 130,
                       zorder=3, label=m["name"])
        front = pareto_front(pts)
        if len(front) > 1:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], ls="--", color="gray", lw=1,
                    zorder=2, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.04 * top, 1.08 * top))
        ax.set_xlim(left=0, right=1.12 * max([x for x, _ in pts] or [1.0]))
        ax.grid(alpha=0.3)

    for r, task in enumerate(tasks):
        key, ylabel = ACCURACY[task]
        rows = [m for m in modes if task in m and m[task].get(key) is not None]
        for c, (xkey, scale, xlabel) in enumerate((("ttft_flops", 1e-9, "analytical TTFT (GFLOPs)"),
                                                   ("ttft_s", 1.0, "measured TTFT (s, median)"))):
            top = result["settings"]["gen_tokens"] if task == "genagree" else 1.0
            panel(axes[r][c], rows, [(m[xkey] * scale, m[task][key]) for m in rows], xlabel, ylabel, top)
            if r == 0:
                axes[r][c].set_title(f"accuracy vs {'FLOPs' if c == 0 else 'measured TTFT'} "
                                     f"({result['settings']['prompt_len']}-token prompts)")
    for r, n in enumerate(lengths, start=len(tasks)):
        rows = [m for m in modes if n in m.get("docqa", {})]
        for c, (key, ylabel) in enumerate((("agreement", "answer agreement with base"),
                                           ("first_token_agreement", "first-token agreement"))):
            # the base's own answer is the reference: it agrees with itself
            pts = [(m["docqa_flops"][n] * 1e-9, 1.0 if m["mode"] == "base" else m["docqa"][n][key]) for m in rows]
            panel(axes[r][c], rows, pts, f"analytical TTFT at {n} tokens (GFLOPs)", ylabel)
            axes[r][c].set_title(f"docqa: {n}-token document + question (chat)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
