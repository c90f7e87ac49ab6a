"""One PNG per pre-study, in the style of the paper's pre-study figure: layers on x, one line per
capability (or per signal), the suggested layers marked. x is the paper's layer number: 0 = the
embeddings, l = decoder layer index l-1 (attention of decoder layer k is drawn at x = k+1, where its
output is). The confidence figure has the temperature on x (it is a property of the output head).
"""

from __future__ import annotations

from pathlib import Path

from drivekd.analyze.measure import CONFIDENCE_FIELDS
from drivekd.roles import CAPABILITIES

COLOURS = {"all": "#333333", "perception": "#1f77b4", "reasoning": "#2ca02c", "planning": "#d62728"}
FILES = {
    "representation": "representation.png",
    "intra_consistency": "intra_consistency.png",
    "dispersion": "dispersion.png",
    "confidence": "confidence.png",
}


def _figure(ncols: int, width: float = 5.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _line(ax, xs, ys, label, colour, style="-", marker="o"):
    pts = [(x, y) for x, y in zip(xs, ys or []) if y is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, markersize=3.5, color=colour, label=label, linewidth=1.4)


def _finish(ax, title, ylabel, L, marks: dict[str, int] | None = None):
    for role, k in (marks or {}).items():
        ax.axvline(k + 1, color=COLOURS[role], alpha=0.35, linestyle=":", linewidth=1.5)
    ax.set_xlabel("layer (0 = embeddings, l = decoder layer l-1)")
    ax.set_xticks(range(0, L + 1, max(1, (L + 1) // 14)))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, pad=12)  # room for matplotlib's axis offset label (e.g. "1e-6")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _marks(a: dict) -> dict[str, int]:
    lay = a["suggestion"]["layers"]
    return {"perception": lay["perception"][0], "planning": lay["planning"][0]}


def representation_png(a: dict, L: int, path: Path) -> Path:
    r = a["representation"]
    fig, (ax1, ax2) = _figure(2)
    _line(ax1, range(1, L + 1), r["adjacent"], "all", COLOURS["all"])
    _line(ax2, range(0, L + 1), r["vision_text"], "all", COLOURS["all"])
    for c, sub in r["by_capability"].items():
        _line(ax1, range(1, L + 1), sub["adjacent"], c, COLOURS[c], "--", ".")
        _line(ax2, range(0, L + 1), sub["vision_text"], c, COLOURS[c], "--", ".")
    _finish(ax1, "Adjacent-layer similarity cos(h^l, h^(l-1))", "cosine", L)
    _finish(ax2, "Vision-text similarity cos(mean_V h, mean_X h)", "cosine", L, {"perception": _marks(a)["perception"]})
    fig.suptitle(f"Representation view ({r['n_samples']} questions)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def intra_consistency_png(a: dict, L: int, path: Path) -> Path:
    fig, (ax,) = _figure(1, 6.5)
    for c in CAPABILITIES:
        v = a["intra_consistency"][c]
        _line(ax, range(0, L + 1), v["cosine"], f"{c} ({v['n_images']} images)", COLOURS[c])
    _finish(ax, "Capability intra-consistency: mean pairwise cosine of per-image centres", "cosine", L,
            {"planning": _marks(a)["planning"]})
    fig.tight_layout()
    fig.savefig(path)
    return path


def dispersion_png(a: dict, L: int, path: Path) -> Path:
    d = a["dispersion"]
    fig, (ax1, ax2) = _figure(2)
    _line(ax1, range(0, L + 1), d["hidden"], "hidden state, across questions", COLOURS["all"])
    _line(ax2, range(1, L + 1), d["attention"], "attention on prefix, across questions", COLOURS["all"])
    rw = d["rewording"]
    if rw["n_pairs"]:
        _line(ax1, range(0, L + 1), rw["hidden"], f"under rewording ({rw['n_pairs']} pairs)", "#9467bd", "--", "s")
        _line(ax2, range(1, L + 1), rw["attention"], f"under rewording ({rw['n_pairs']} pairs)", "#9467bd", "--", "s")
    _finish(ax1, "Hidden state (last answer token): 1 - cos", "dispersion", L)
    _finish(ax2, "Head-mean attention on the shared prefix: 1 - cos", "dispersion", L)
    fig.suptitle(f"Dispersion across questions of one image ({d['n_images']} images)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def confidence_png(a: dict, path: Path) -> Path:
    c = a["confidence"]
    taus = c["temperatures"]
    fig, axes = _figure(3, 4.2)
    titles = {"top1": "top-1 probability", "top10_mass": "top-10 mass", "margin": "margin p1 - mean(p2..p10)"}
    for ax, f in zip(axes, CONFIDENCE_FIELDS):
        if c["all"]:
            _line(ax, taus, c["all"][f], "all", COLOURS["all"])
        for cap, sub in c["by_capability"].items():
            _line(ax, taus, sub[f], cap, COLOURS[cap], "--", ".")
        ax.set_xscale("log", base=2)
        ax.set_xticks(taus, [f"{t:g}" for t in taus])
        ax.set_xlabel("temperature tau")
        ax.set_title(titles[f], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Output confidence on answer tokens", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_figures(a: dict, L: int, out: Path) -> dict[str, str]:
    """Write the four PNGs under `out`; returns {analysis: file name}."""
    representation_png(a, L, out / FILES["representation"])
    intra_consistency_png(a, L, out / FILES["intra_consistency"])
    dispersion_png(a, L, out / FILES["dispersion"])
    confidence_png(a, out / FILES["confidence"])
    return dict(FILES)
