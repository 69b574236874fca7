"""Pareto plots of accuracy vs time-to-first-token cost (as in the KV Prediction paper's figures): one row per
task, columns analytical TTFT FLOPs and measured TTFT; one point per mode/bundle; the frontier drawn."""

from __future__ import annotations

from typing import Sequence

from mlx_kvpred.errors import KVPredError

from .eval_harness import ACCURACY


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


def plot_pareto(result: dict, path: str) -> None:
    """Write the PNG: rows = tasks run, columns = (TTFT GFLOPs, measured TTFT s)."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in result["settings"]["tasks"] if t in ACCURACY]
    modes = result["modes"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    colors = {"base": "black", "kvp": "tab:blue", "aux": "tab:orange"}
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    bundles = list(dict.fromkeys(m["bundle"] for m in modes if m["bundle"]))
    for r, task in enumerate(tasks):
        key, ylabel = ACCURACY[task]
        rows = [m for m in modes if task in m and m[task].get(key) is not None]
        for c, (xkey, scale, xlabel) in enumerate((("ttft_flops", 1e-9, "analytical TTFT (GFLOPs)"),
                                                   ("ttft_s", 1.0, "measured TTFT (s, median)"))):
            ax = axes[r][c]
            pts = [(m[xkey] * scale, m[task][key]) for m in rows]
            for m, (x, y) in zip(rows, pts):  # named in the legend: labels next to close points overlap
                marker = markers[bundles.index(m["bundle"]) % len(markers)] if m["bundle"] else "*"
                ax.scatter([x], [y], color=colors.get(m["mode"], "gray"), marker=marker, s=70 if m["bundle"] else 130,
                           zorder=3, label=m["name"])
            front = pareto_front(pts)
            if len(front) > 1:
                ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], ls="--", color="gray", lw=1,
                        zorder=2, label="Pareto front")
            ax.legend(loc="best", fontsize=8)
            top = result["settings"]["gen_tokens"] if task == "genagree" else 1.0
            ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.04 * top, 1.08 * top))
            ax.set_xlim(left=0, right=1.12 * max([x for x, _ in pts] or [1.0]))
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"accuracy vs {'FLOPs' if c == 0 else 'measured TTFT'} "
                             f"({result['settings']['prompt_len']}-token prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
