"""Plots and a markdown summary of one or more training runs, read from their metrics.jsonl.

    drivekd-report runs/multi-agp runs/multi-none runs/multi-g1 --out runs/report

Several runs are overlaid, one colour each, the same in every figure. Files written to --out:

    losses.png       the weighted total loss and each row's loss (CE, then one per teacher term)
    weights.png      each row's loss weight over steps (moves with --dynamic-weights)
    conflict.png     cosine of each capability's gradient with CE's, per step (below 0: the two
                     pull the student in conflicting directions), and the projections that fired
                     per micro-step: the picture of what AGP does on this data
    shares.png       each row's share of the applied update per step (log scale), with the
                     --contribution-warn line: a teacher term far below it barely moves the student
    lr_throughput.png  learning rate, samples/s and tokens/s
    eval.png         validation (--eval-data): eval/ce, each teacher row's eval loss, and (--eval-generate)
                     the multiple-choice accuracy per capability; the best step of --save-best marked
    summary.md       one table row per run (with its validation and best step), runs whose curves are
                     identical, and the figures

Runs that coincide stay visible: each run has its own line style and marker shape as well as its
colour, and the markers of different runs sit at different steps, so a run drawn over another with
the same values does not hide it; summary.md names every pair of runs whose loss curves are
identical (equal values at every logged step), with the other curves they share.

What is plotted comes from the loop's metrics records (drivekd/trainer/loop.py, `_finish_step`):
`loss`, `loss_<row>`, `weights{row}`, `grad_cos{"ce|<role>"}` (the mean over the step's
micro-steps), `projections_fired` (summed over the step's micro-steps), `lr`, `samples_per_s`,
`tokens_per_s`, `peak_mem_bytes`, `share_<row>` and `along_<row>` (drivekd/trainer/contribution.py);
the validation records (drivekd/trainer/validation.py): `eval_ce`, `eval_loss_<row>`, `eval_raw_<row>`,
`eval_acc_<capability>`, `eval_acc`, and run.json's `best`.
Runs whose loop kept no per-loss gradients (--projection none without re-weighting) have no
cosines: their panels say so instead of drawing nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from drivekd.errors import DataError
from drivekd.roles import CAPABILITIES

FILES = ("losses.png", "weights.png", "conflict.png", "shares.png", "lr_throughput.png", "eval.png", "summary.md")
# Keys that differ between identical runs (timings, memory) or are the x axis: never compared as curves.
_NOT_CURVES = {"step", "epoch", "samples_per_s", "tokens_per_s", "step_time_s", "peak_mem_bytes", "eval_seconds"}


@dataclass
class Run:
    """One run's metrics: `records` in step order; `info` is run.json ({} when absent)."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[str]:
        """The loss rows: 'ce', then the teacher terms (run.json's order, else the records' keys)."""
        if self.info.get("rows"):
            return list(self.info["rows"])
        keys = [k[5:] for r in self.records for k in r if k.startswith("loss_")]
        return list(dict.fromkeys(keys))

    @property
    def grad_accum(self) -> int | None:
        return (self.info.get("config") or {}).get("grad_accum")

    def setting(self, key: str) -> Any:
        return (self.info.get("config") or {}).get(key)


def load_run(path: str | Path) -> Run:
    """A run folder (or its metrics.jsonl) -> Run. Raises DataError naming the file and line."""
    path = Path(path)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    folder = metrics.parent
    if not metrics.exists():
        raise DataError(f"{path}: no metrics.jsonl here; pass the folder a drivekd-train run wrote (its --out)")
    records = []
    for n, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{metrics}, line {n}: not JSON ({e}); a run killed mid-write may leave a cut last line: "
                            "delete it or resume the run (resume rewrites the file)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise DataError(f"{metrics}, line {n}: a metrics record needs an integer 'step'")
        records.append(rec)
    if not records:
        raise DataError(f"{metrics} has no records yet: the run logs one per --log-every optimizer steps")
    info: dict[str, Any] = {}
    run_json = folder / "run.json"
    if run_json.exists():
        try:
            info = json.loads(run_json.read_text(encoding="utf-8"))
        except ValueError:
            info = {}  # run.json is only used for labels and grad_accum; the metrics still plot
    records.sort(key=lambda r: r["step"])
    return Run(folder.name, folder, records, info)


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Labels for runs: the folder names, lengthened by parent folders until they differ."""
    paths = [p.resolve() for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


# ----------------------------------------------------------------------------- series (pure)


def series(records: Sequence[dict[str, Any]], *keys: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the field at `keys` (e.g. ("weights", "ce")), skipping records where it
    is absent, None or not finite."""
    xs, ys = [], []
    for r in records:
        v: Any = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): the trend of a noisy curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def projections_per_micro(run: Run) -> tuple[list[int], list[float]]:
    """Projections that fired per micro-step, per optimizer step (the record sums a step's micro-steps)."""
    xs, ys = series(run.records, "projections_fired")
    per = run.grad_accum or 1
    return xs, [y / per for y in ys]


def share_stats(run: Run, row: str) -> dict[str, float] | None:
    """Mean over the logged steps of the row's norm share and along-share of the update (None
    when the run logged no shares: an older drivekd, or --no-contribution)."""
    _, share = series(run.records, f"share_{row}")
    if not share:
        return None
    _, along = series(run.records, f"along_{row}")
    return {"share": sum(share) / len(share), "along": sum(along) / len(along) if along else None, "steps": len(share)}


def conflict_stats(run: Run, role: str) -> dict[str, float] | None:
    """Mean cosine of `role`'s gradient with CE's and the share of steps where it was < 0."""
    _, cos = series(run.records, "grad_cos", f"ce|{role}")
    if not cos:
        return None
    return {"mean_cos": sum(cos) / len(cos), "negative_share": sum(c < 0 for c in cos) / len(cos), "steps": len(cos)}


# ----------------------------------------------------------------------------- figures


def _figure(n_panels: int, title: str, cols: int = 2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(cols, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(5.2 * cols, 3.3 * rows + 0.7), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    fig.suptitle(title, fontsize=12)
    return fig, axes


@dataclass
class Look:
    """How one run is drawn in every figure: colour, line style and marker, and its place among the
    runs (its markers sit at other steps than the other runs', so coinciding curves stay visible)."""

    color: Any
    linestyle: str
    marker: str
    index: int
    runs: int


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _looks(n: int) -> list[Look]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [Look(cmap(i % 10), _LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)], i, n) for i in range(n)]


def _markevery(n_points: int, look: Look) -> tuple[int, int]:
    """About 8 markers per curve, each run's shifted by its index: over identical curves they alternate."""
    every = max(1, n_points // 8)
    return ((look.index * max(1, every // look.runs)) % every, every)


def _plot(ax, xs, ys, look: Look, label, smooth: bool = True) -> None:
    """A noisy per-step curve: faint raw values and, with enough points, a running mean; in the run's
    line style, with its markers (hollow, shrinking with the run's index, so one over another shows both)."""
    if not xs:
        return
    window = max(1, len(ys) // 25) if smooth else 1
    style = dict(color=look.color, linestyle=look.linestyle, marker=look.marker, markersize=max(3.0, 7.0 - 1.5 * look.index),
                 markerfacecolor="none", markeredgewidth=1.1, markevery=_markevery(len(xs), look), label=label)
    if window > 1:
        ax.plot(xs, ys, color=look.color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, running_mean(ys, window), linewidth=1.6, **style)
    else:
        ax.plot(xs, ys, linewidth=1.4, **style)


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)


def _finish(fig, axes, runs: Sequence[Run], colors, path: Path) -> Path:
    from matplotlib.lines import Line2D

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
    handles = [Line2D([], [], color=c.color, linestyle=c.linestyle, marker=c.marker, markerfacecolor="none", linewidth=1.6)
               for c in colors]
    fig.legend(handles, [r.name for r in runs], loc="upper center", ncol=min(len(runs), 4), fontsize=9,
               bbox_to_anchor=(0.5, 0.965), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(runs) <= 4 else 0.9))
    fig.savefig(path)
    return path


def _all_rows(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(r for run in runs for r in run.rows))


def plot_losses(runs: Sequence[Run], path: Path) -> Path:
    rows = _all_rows(runs)
    fig, axes = _figure(1 + len(rows), "Losses (weighted total, then each row unweighted)")
    colors = _looks(len(runs))
    for run, c in zip(runs, colors):
        _plot(axes[0], *series(run.records, "loss"), c, run.name)
        for ax, row in zip(axes[1:], rows):
            _plot(ax, *series(run.records, f"loss_{row}"), c, run.name)
    axes[0].set_title("total (weighted)", fontsize=10)
    for ax, row in zip(axes[1:], rows):
        ax.set_title("CE (answer tokens)" if row == "ce" else f"{row} teacher term", fontsize=10)
    return _finish(fig, axes, runs, colors, path)


def plot_weights(runs: Sequence[Run], path: Path) -> Path:
    rows = _all_rows(runs)
    fig, axes = _figure(len(rows), "Loss weights over steps (online re-weighting)")
    colors = _looks(len(runs))
    for run, c in zip(runs, colors):
        for ax, row in zip(axes, rows):
            _plot(ax, *series(run.records, "weights", row), c, run.name, smooth=False)
    for ax, row in zip(axes, rows):
        ax.set_title(f"weight of {row}", fontsize=10)
    return _finish(fig, axes, runs, colors, path)


def plot_conflict(runs: Sequence[Run], path: Path) -> Path:
    caps = [r for r in _all_rows(runs) if r != "ce"]
    fig, axes = _figure(len(caps) + 1, "Gradient conflict: cos(grad CE, grad capability) and AGP projections")
    colors = _looks(len(runs))
    for ax, role in zip(axes, caps):
        drawn = False
        for run, c in zip(runs, colors):
            xs, ys = series(run.records, "grad_cos", f"ce|{role}")
            _plot(ax, xs, ys, c, run.name)
            drawn |= bool(xs)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axhspan(-1.0, 0.0, color="tab:red", alpha=0.05)  # conflicting directions
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"cos(CE, {role}): below 0 = conflict", fontsize=10)
        if not drawn:
            _empty(ax, "no per-loss gradients in these runs\n(--projection none without re-weighting)")
    ax = axes[-1]
    drawn = False
    for run, c in zip(runs, colors):
        xs, ys = projections_per_micro(run)
        _plot(ax, xs, ys, c, run.name)
        drawn |= bool(xs)
    ax.set_title("projections fired per micro-step", fontsize=10)
    ax.set_ylim(bottom=0)
    if not drawn:
        _empty(ax, "no projection in these runs")
    if not caps:
        _empty(axes[0], "CE only: no teacher terms")
    return _finish(fig, axes, runs, colors, path)


def plot_shares(runs: Sequence[Run], path: Path) -> Path:
    rows = _all_rows(runs)
    fig, axes = _figure(len(rows), "Share of the applied update: |lambda_k| ||g_k|| / sum_j |lambda_j| ||g_j||")
    colors = _looks(len(runs))
    floor = 1e-9  # a log axis cannot show 0: shares below are drawn at the floor
    for ax, row in zip(axes, rows):
        drawn = False
        for run, c in zip(runs, colors):
            xs, ys = series(run.records, f"share_{row}")
            _plot(ax, xs, [max(y, floor) for y in ys], c, run.name)
            drawn |= bool(xs)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, 1.5)
        if row != "ce":
            warn = next((r.setting("contribution_warn") for r in runs if r.setting("contribution_warn")), 0.01)
            ax.axhline(warn, color="tab:red", linewidth=0.8, linestyle="--")  # --contribution-warn
        ax.set_title("CE" if row == "ce" else f"{row} teacher term", fontsize=10)
        if not drawn:
            _empty(ax, "no shares logged in these runs\n(--no-contribution, or an older drivekd)")
    return _finish(fig, axes, runs, colors, path)


def plot_lr_throughput(runs: Sequence[Run], path: Path) -> Path:
    fig, axes = _figure(3, "Learning rate and throughput", cols=3)
    colors = _looks(len(runs))
    for run, c in zip(runs, colors):
        _plot(axes[0], *series(run.records, "lr"), c, run.name, smooth=False)
        _plot(axes[1], *series(run.records, "samples_per_s"), c, run.name)
        _plot(axes[2], *series(run.records, "tokens_per_s"), c, run.name)
    for ax, title in zip(axes, ("learning rate", "samples / s", "tokens / s")):
        ax.set_title(title, fontsize=10)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _finish(fig, axes, runs, colors, path)


def eval_keys(runs: Sequence[Run]) -> list[str]:
    """The validation keys any run logged, in a fixed order: eval_ce, each row's loss and raw, the accuracies."""
    have = {k for run in runs for r in run.records for k, v in r.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    rows = _all_rows(runs)
    order = ["eval_ce", *(f"eval_{p}_{r}" for r in rows for p in ("loss", "raw")),
             *(f"eval_acc_{c}" for c in CAPABILITIES), "eval_acc"]
    return [k for k in order if k in have]


def plot_eval(runs: Sequence[Run], path: Path) -> Path:
    from drivekd.trainer.validation import record_key

    keys = eval_keys(runs)
    fig, axes = _figure(max(2, len(keys)), "Validation (--eval-data): the best step of --save-best circled")
    colors = _looks(len(runs))
    for ax, key in zip(axes, keys):
        for run, c in zip(runs, colors):
            xs, ys = series(run.records, key)
            _plot(ax, xs, ys, c, run.name, smooth=False)
            best = run.info.get("best") or {}
            if record_key(best.get("metric", "")) == key and best.get("step") in xs:
                ax.plot([best["step"]], [best["value"]], marker="o", markersize=12, markerfacecolor="none", color=c.color)
        ax.set_title(key.replace("_", "/", 1) + (" (%)" if key.startswith("eval_acc") else ""), fontsize=10)
        if key.startswith("eval_acc"):
            ax.set_ylim(-3, 103)
    if not keys:
        _empty(axes[0], "no validation in these runs\n(drivekd-train --eval-data FILE)")
    out = _finish(fig, axes, runs, colors, path)
    for ax in axes[max(1, len(keys)):]:  # the figure keeps two panels' width: the unused one blank
        ax.set_axis_off()
    fig.savefig(path)
    return out


# ----------------------------------------------------------------------------- summary


def identical_curves(runs: Sequence[Run]) -> list[tuple[str, str, list[str]]]:
    """Pairs of runs whose loss curves are identical (the same steps and the same values), with every
    curve the two share exactly (timings and memory aside): (run a, run b, keys)."""
    out = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            keys = sorted({k for run in (a, b) for r in run.records for k in r} - _NOT_CURVES)
            same = []
            for k in keys:
                sa, sb = series(a.records, k), series(b.records, k)
                if sa[0] and sa == sb:
                    same.append(k)
            if "loss" in same or (not series(a.records, "loss")[0] and "eval_ce" in same):
                out.append((a.name, b.name, same))
    return out


def _identical_lines(runs: Sequence[Run]) -> list[str]:
    pairs = identical_curves(runs)
    if not pairs:
        return []
    lines = ["## Identical curves", ""]
    for a, b, keys in pairs:
        shown = ", ".join(f"`{k}`" for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        lines.append(f"- `{a}` and `{b}` have identical curves ({shown}: the same value at every logged step); the "
                     "figures draw them in distinct line styles and markers, so neither hides the other.")
    return [*lines, ""]


def _best_cell(run: Run) -> str:
    best = run.info.get("best")
    return f"{best['metric']} {best['value']:.4g} @ step {best['step']}" if isinstance(best, dict) and "step" in best else "-"


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2g}%"


def summary_markdown(runs: Sequence[Run], figures: Sequence[str]) -> str:
    caps = [r for r in _all_rows(runs) if r != "ce"]
    lines = ["# Training runs", ""]
    head = ["run", "recipe", "projection", "steps", "loss first -> last", "CE first -> last"]
    head += [f"cos(CE, {c}) mean / share < 0" for c in caps]
    head += [f"{c} share of update (norm / along)" for c in caps]
    head += ["steps with a projection", "projections / micro-step", "samples/s", "peak memory (GB)"]
    validated = any(series(run.records, "eval_ce")[0] for run in runs)
    if validated:
        head += ["eval/ce first -> last", "best (--save-best)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        _, loss = series(run.records, "loss")
        _, ce = series(run.records, "loss_ce")
        _, fired = series(run.records, "projections_fired")
        _, per_micro = projections_per_micro(run)
        _, sps = series(run.records, "samples_per_s")
        _, mem = series(run.records, "peak_mem_bytes")
        cells = [run.name, str(run.setting("recipe") or "-"), str(run.setting("projection") or "-"),
                 str(run.records[-1]["step"]),
                 f"{_fmt(loss[0])} -> {_fmt(loss[-1])}" if loss else "-",
                 f"{_fmt(ce[0])} -> {_fmt(ce[-1])}" if ce else "-"]
        for c in caps:
            st = conflict_stats(run, c)
            cells.append(f"{st['mean_cos']:+.3f} / {st['negative_share']:.0%}" if st else "-")
        for c in caps:
            sh = share_stats(run, c)
            cells.append(f"{_pct(sh['share'])} / {_pct(sh['along'])}" if sh else "-")
        cells += [f"{sum(f > 0 for f in fired) / len(fired):.0%}" if fired else "-",
                  _fmt(sum(per_micro) / len(per_micro), ".3g") if per_micro else "-",
                  _fmt(sum(sps) / len(sps), ".3g") if sps else "-",
                  _fmt(max(mem) / 1e9, ".3g") if mem else "-"]
        if validated:
            _, ev = series(run.records, "eval_ce")
            cells += [f"{_fmt(ev[0])} -> {_fmt(ev[-1])}" if ev else "-", _best_cell(run)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "cos(CE, role): cosine of the role's gradient with the CE gradient, averaged over each step's "
        "micro-steps; the first number is its mean over the logged steps, the second the share of steps "
        "where it was negative (the two losses pulled apart). Projections: AGP/G1/G2 projections that "
        "removed a conflicting component, counted per optimizer step by the loop; `steps with a "
        "projection` is the share of logged steps with at least one. Peak memory: CUDA max allocated, or "
        "the process's peak RSS on CPU. Share of update: the teacher term's part of the applied update, "
        "mean over the logged steps; norm = |lambda_k| ||g_k|| over the sum of all rows', along = its "
        "component along the update (the rows' along-shares sum to 1). A term under 1% barely moves the "
        "student: README, 'How much the teacher terms count'."
        + (" eval/ce: the validation CE (drivekd-train --eval-data) at the run's first and last validation; best: "
           "the step and value --save-best kept as RUN/best/ (run.json)." if validated else ""),
        "",
        *_identical_lines(runs),
    ]
    for name in figures:
        lines += [f"![{name[:-4]}]({name})", ""]
    return "\n".join(lines)


def write_report(paths: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Load the runs at `paths` and write the figures and summary.md to `out`; returns the files."""
    if not paths:
        raise DataError("no run given: pass one or more drivekd-train run folders")
    runs = [load_run(p) for p in paths]
    for run, name in zip(runs, unique_names([r.path for r in runs])):
        run.name = name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_losses(runs, out / "losses.png"),
        plot_weights(runs, out / "weights.png"),
        plot_conflict(runs, out / "conflict.png"),
        plot_shares(runs, out / "shares.png"),
        plot_lr_throughput(runs, out / "lr_throughput.png"),
        plot_eval(runs, out / "eval.png"),
    ]
    summary = out / "summary.md"
    summary.write_text(summary_markdown(runs, [p.name for p in written]), encoding="utf-8")
    return [*written, summary]


__all__ = ["FILES", "Run", "conflict_stats", "eval_keys", "identical_curves", "plot_eval", "share_stats", "load_run", "running_mean", "series", "summary_markdown", "write_report"]
