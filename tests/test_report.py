"""Watching runs: metric loggers (--report-to) and drivekd-report's plots and summary."""

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from drivekd.data.loaders import load_samples
from drivekd.errors import ConfigError
from drivekd.trainer.report_to import MetricLoggers, flatten, installed, parse_report_to
from drivekd.trainer.runs_report import FILES, conflict_stats, running_mean, series
from drivekd.trainer.settings import TrainConfig
from online_targets import compute_targets

pytestmark = pytest.mark.usefixtures("one_thread")

needs_tensorboard = pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard is a drivekd dependency: make install")


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder, read back through tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------- pure pieces


def test_flatten_turns_a_metrics_record_into_scalar_tags():
    rec = {"step": 3, "loss": 1.5, "weights": {"ce": 1.0, "perception": 0.5}, "grad_cos": {"ce|perception": -0.25},
           "grad_norms": None, "skipped": ["a", "b"], "peak_mem_kind": "cpu_peak_rss", "projections_fired": 2}
    # grouped by concern (train/, weights/, grad/, share/, system/), not one top-level group per key
    assert flatten(rec) == {"train/loss": 1.5, "weights/ce": 1.0, "weights/perception": 0.5,
                            "grad/cos/ce_vs_perception": -0.25, "train/skipped": 2.0, "grad/projections_fired": 2.0}
    more = {"grad_norm": 2.0, "grad_norms": {"ce": 1.0}, "lr": 1e-3, "loss_ce": 1.0, "raw_perception": 0.1,
            "samples_per_s": 3.0, "peak_mem_bytes": 5, "active_share": {"ce": 1.0}}
    assert set(flatten(more)) == {"grad/norm", "grad/norms/ce", "train/lr", "train/loss_ce", "train/raw_perception",
                                  "system/samples_per_s", "system/peak_mem_bytes", "grad/active_share/ce"}


def test_report_to_parsing_and_config_check():
    assert parse_report_to("none") == ()
    assert parse_report_to("") == ()
    with pytest.raises(ConfigError, match="--report-to: unknown reporter 'mlflow'"):
        parse_report_to("tensorboard,mlflow")
    with pytest.raises(ConfigError, match="--report-to"):
        TrainConfig(report_to="tensorbored")
    if installed("tensorboard"):
        assert parse_report_to(" TensorBoard , tensorboard") == ("tensorboard",)
        assert TrainConfig().report_to == "tensorboard"  # the default when installed
    if not installed("wandb"):
        with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package .*--report-to none"):
            parse_report_to("wandb")


def test_running_mean_and_conflict_stats():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    recs = [{"step": 1, "grad_cos": {"ce|planning": 0.5}}, {"step": 2, "grad_cos": None},
            {"step": 3, "grad_cos": {"ce|planning": -0.3}}, {"step": 4, "grad_cos": {"ce|planning": -0.1}}]
    assert series(recs, "grad_cos", "ce|planning") == ([1, 3, 4], [0.5, -0.3, -0.1])
    from drivekd.trainer.runs_report import Run

    st = conflict_stats(Run("r", Path("."), recs), "planning")
    assert st["mean_cos"] == pytest.approx(0.1 / 3) and st["negative_share"] == pytest.approx(2 / 3)
    assert conflict_stats(Run("r", Path("."), recs), "perception") is None


@needs_tensorboard
def test_resumed_tensorboard_log_drops_the_killed_steps(tmp_path):
    """A killed run logged steps 1-4; resuming from step 2 rewrites 3-4: the log reads as one run."""
    first = MetricLoggers.open(tmp_path, "tensorboard", {})
    for step in range(1, 5):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricLoggers.open(tmp_path, "tensorboard", {}, first_step=3)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


@pytest.mark.skipif(not installed("wandb"), reason="wandb is optional (pip install 'drivekd[wandb]'); "
                    "its logger is tested only where it is installed")
def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = MetricLoggers.open(tmp_path, "wandb", {"recipe": "multi"})
    loggers.log({"step": 1, "loss": 2.0, "weights": {"ce": 1.0}})
    loggers.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


# ----------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def tiny_run(tiny_models, demo_data, tmp_path_factory):
    """Three optimizer steps of multi + AGP with re-weighting, logged to TensorBoard."""
    from drivekd.trainer.loop import train

    samples = load_samples(demo_data / "train.json")
    targets = compute_targets(tiny_models / "internvl-teacher", samples, {"perception": [0], "reasoning": [0, 1, 2, 3, 4],
                                                                          "planning": [4]})
    out = tmp_path_factory.mktemp("runs") / "multi-agp"
    cfg = TrainConfig(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0,
                      progress=False, max_steps=3, grad_accum=2, micro_batch=1, save_every=0, lr=1e-3, warmup_ratio=0.0,
                      dynamic_weights=True, projection="agp", report_to="tensorboard" if installed("tensorboard") else "none")
    train(cfg, targets)
    return out


@needs_tensorboard
def test_training_run_writes_its_metrics_to_tensorboard(tiny_run):
    lines = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(tiny_run / "tensorboard")
    for tag in ("train/loss", "train/loss_ce", "train/loss_planning", "train/lr", "weights/perception",
                "grad/cos/ce_vs_reasoning", "grad/projections_fired", "system/samples_per_s", "system/peak_mem_bytes"):
        assert tag in scalars, tag
    for tag, expected in flatten(lines[-1]).items():
        steps = [s for s, _ in scalars[tag]]
        assert steps == [1, 2, 3], tag
        assert scalars[tag][-1][1] == pytest.approx(expected, rel=1e-6), tag  # event files hold float32


def _synthetic_run(folder: Path, steps: int = 40) -> Path:
    """A metrics.jsonl as the loop writes it, for a longer run than a test can train: cosines that
    swing through conflict, a projection on every other step."""
    folder.mkdir(parents=True)
    rows = ["ce", "perception", "reasoning", "planning"]
    (folder / "run.json").write_text(json.dumps({"config": {"recipe": "multi", "projection": "g1", "grad_accum": 4},
                                                 "rows": rows}))
    with (folder / "metrics.jsonl").open("w") as fh:
        for s in range(1, steps + 1):
            cos = {f"ce|{r}": math.cos(s / 3 + i) for i, r in enumerate(rows[1:])}
            rec = {"step": s, "lr": 1e-4 * (1 - s / steps), "loss": 5 / s, **{f"loss_{r}": 1 / s for r in rows},
                   "weights": {r: 1 + 0.01 * s for r in rows}, "grad_cos": cos, "projections_fired": s % 2 * 3,
                   "samples_per_s": 8.0, "tokens_per_s": 800.0, "peak_mem_bytes": 2_000_000_000}
            fh.write(json.dumps(rec) + "\n")
    return folder


@pytest.mark.slow
def test_report_overlays_two_runs(tiny_run, tmp_path):
    """drivekd-report on a trained run and a synthetic one, through the CLI (in process: a second
    interpreter would only add its imports)."""
    from click.testing import CliRunner

    from drivekd.cli.report import main as report_cli

    other = _synthetic_run(tmp_path / "multi-g1")
    r = CliRunner().invoke(report_cli, [str(tiny_run), str(other), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("drivekd-report: 2 run(s) -> ")
    files = [tmp_path / "report" / f for f in FILES]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(FILES)
    assert all(str(f) in r.output for f in files)
    for f in files[:-1]:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 800
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| multi-agp | multi | agp | 3 |" in md
    # The synthetic run: cos(CE, perception) = cos(s/3) over s = 1..40 is negative on 19 of 40 steps,
    # every other step had 3 projections (1.5 per step / 4 micro-steps).
    neg = sum(math.cos(s / 3) < 0 for s in range(1, 41)) / 40
    row = next(l for l in md.splitlines() if l.startswith("| multi-g1 |"))
    assert f"/ {neg:.0%}" in row and "| 50% | 0.375 |" in row
    assert "![conflict](conflict.png)" in md


def test_report_cli_error_names_the_folder(tmp_path):
    # (the CLI's success path: test_report_overlays_two_runs)
    from click.testing import CliRunner

    from drivekd.cli.report import main as report_cli

    bad = CliRunner().invoke(report_cli, [str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "no metrics.jsonl" in bad.output and "Traceback" not in bad.output, bad.output


def _blue_pixels(png: Path) -> int:
    """Pixels of the first run's colour (tab10 blue) in the panels, below the legend."""
    import numpy as np

    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    a = a[int(a.shape[0] * 0.15):]
    return int((np.abs(a - np.array([31, 119, 180])).sum(-1) < 40).sum())


@pytest.mark.slow
def test_report_shows_coinciding_runs_and_names_identical_curves(tmp_path):
    """Two runs with the same values (a rerun, or a setting that changed nothing): the second is drawn
    over the first, yet the first stays visible, and summary.md says the curves are identical."""
    from drivekd.trainer.runs_report import identical_curves, load_run, plot_losses, summary_markdown

    a = _synthetic_run(tmp_path / "a", steps=12)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    c = _synthetic_run(tmp_path / "c", steps=12)
    recs = [json.loads(l) for l in (c / "metrics.jsonl").read_text().splitlines()]
    (c / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": r["loss"] + 0.5}) + "\n" for r in recs))
    md = summary_markdown([load_run(p) for p in (a, b, c)], [])
    assert "## Identical curves" in md
    pair = next(l for l in md.splitlines() if l.startswith("- `a` and `b`"))
    assert "`loss`" in pair and "`loss_ce`" in pair and "`lr`" in pair
    assert "`c`" not in md.split("## Identical curves")[1].split("![")[0]  # c's loss differs
    assert [(x, y) for x, y, _ in identical_curves([load_run(p) for p in (a, b, c)])] == [("a", "b")]
    # the first run (blue, drawn first) stays visible under the second: about a quarter of its pixels
    # (hollow markers, dashes); drawn as before (one style, the same markers) not one pixel showed
    alone = plot_losses([load_run(a)], tmp_path / "alone.png")
    both = plot_losses([load_run(a), load_run(b)], tmp_path / "both.png")
    assert _blue_pixels(both) > 0.15 * _blue_pixels(alone), (_blue_pixels(both), _blue_pixels(alone))
