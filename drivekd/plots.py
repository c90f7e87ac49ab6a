"""Plots shared by the reports (eval, comparison, ablation): matplotlib's Agg canvas, no display."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def bar_png(
    path: Path,
    names: Sequence[str],
    series: Sequence[Sequence[float | None]],
    title: str,
    errors: Sequence[Sequence[float | None]] | None = None,
) -> Path:
    """Grouped bars: one group per metric (perception, reasoning, planning, average), one bar per
    series; `errors` (judge std over runs) are drawn as error bars where given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = ["Perception", "Reasoning", "Planning", "Average"]
    n = len(series)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 1.6 * len(metrics) * max(1, n) ** 0.5 + 2), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, values) in enumerate(zip(names, series)):
        xs = [m + (i - (n - 1) / 2) * width for m in range(len(metrics))]
        heights = [v if v is not None else 0.0 for v in values]
        errs = list(errors[i]) if errors is not None else [None] * len(values)
        bars = ax.bar(xs, heights, width * 0.92, label=name)
        for x, h, e in zip(xs, heights, errs):
            if e:
                ax.errorbar([x], [h], yerr=[e], color="black", capsize=3, linewidth=1)
        for bar, v, e in zip(bars, values, errs):
            label = "n/a" if v is None else f"{v:.1f}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + (e or 0.0)), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8 if n > 2 else 9)
    ax.set_xticks(range(len(metrics)), metrics)
    tops = [(v or 0.0) + (e or 0.0) for i, vs in enumerate(series) for v, e in zip(vs, (errors[i] if errors else [None] * len(vs)))]
    ax.set_ylim(0, max(105.0, max(tops, default=0.0) + 8.0))
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if n > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    return path
