"""`make demo`: the whole pipeline on the embedded default, offline, in a few minutes on 2 cores.

tiny teacher/student checkpoints + synthetic driving data
  -> drivekd-cache build --teacher all         (one teacher pass, three roles, Zarr store)
  -> drivekd-train --recipe multi --projection agp  (student alone, targets from the store)
  -> drivekd-eval on the final checkpoint      (predictions, scores, report.md + chart)

Every step runs the real command-line tool, as a user would, from the project config the demo
writes (DEMO/drivekd.toml). Running it again resumes: finished steps are skipped by the tools.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

FAMILY = "internvl"


def run(args: list[str], cwd: Path) -> None:
    click.echo(click.style(f"$ {' '.join(shlex.quote(a) for a in args)}", bold=True))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        sys.exit(f"demo: step failed (exit {p.returncode}): {' '.join(args)}")
    click.echo(f"  ({time.perf_counter() - t0:.1f} s)\n")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), help="Demo folder.")
@click.option("--steps", default=12, help="Optimizer steps of the demo training run.")
def main(out: Path, steps: int) -> None:
    from drivekd.demo.scenes import make_demo_data, summary_line
    from drivekd.demo.tiny_models import make_tiny_models

    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    models = out / "models"
    if not (models / "tiny-models.json").is_file():
        make_tiny_models(models)
        click.echo(f"tiny checkpoints -> {models}")
    data = out / "data"
    if not (data / "train.json").is_file():
        click.echo(summary_line(make_demo_data(data, groups=6, questions_per_group=4, seed=42)))
    teacher = models / f"{FAMILY}-teacher"
    (out / "drivekd.toml").write_text(
        "# Written by `make demo`: every drivekd command reads its defaults from here.\n"
        f'[data]\ntrain = "data/train.json"\nimages = "data"\neval = "data/drivebench.json"\n\n'
        f'[teachers]\nperception = "{teacher}"\nreasoning = "{teacher}"\nplanning = "{teacher}"\n\n'
        f'[cache]\nout = "cache"\n\n'
        f'[train]\nstudent = "{models / f"{FAMILY}-student"}"\ncache = "cache"\nrecipe = "multi"\nprojection = "agp"\n'
        f"lr = 5e-4\ngrad_accum = 2\nmax_steps = {steps}\nsave_every = 4\nnum_workers = 1\n"
    )
    cfg = str(out / "drivekd.toml")
    run(["drivekd.cli.cache", "build", "--config", cfg, "--teacher", "all"], out)
    run(["drivekd.cli.cache", "info", "cache"], out)
    run(["drivekd.cli.train", "--config", cfg, "--out", "runs/multi-agp", "--resume"], out)
    run(["drivekd.cli.eval", "--model", "runs/multi-agp/final", "--data", "data/drivebench.json", "--images", "data",
         "--out", "eval/multi-agp", "--name", "multi-agp (tiny demo student)", "--max-new-tokens", "16", "--deploy"], out)
    report = out / "eval" / "multi-agp" / "report.md"
    click.echo(report.read_text() if report.is_file() else "no report written")
    click.echo(f"demo done: {out}")


if __name__ == "__main__":
    main()
