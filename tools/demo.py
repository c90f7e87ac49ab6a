"""`make demo`: the whole pipeline on the embedded default, offline, in a few minutes on 2 cores.

the committed trained tiny teacher (drivekd/demo/teacher, trained by tools/train_teacher.py on the
synthetic benchmark; one checkpoint serves as the perception, reasoning and planning teacher)
+ the committed format-pretrained tiny student (drivekd/demo/student: it answers in the template,
at chance, like a pretrained VLM before driving data) + a small slice of the benchmark (drivekd.demo.benchmark, seed 0:
train scenes for the store and the run, held-out scenes for the evaluation)
  -> drivekd-cache build --teacher all         (one teacher pass, three roles, Zarr store)
  -> drivekd-train --recipe multi --projection agp  (student alone, targets from the store)
  -> drivekd-report                            (runs/report/*.png: losses, weights, gradient conflict)
  -> drivekd-eval of the teacher, then of the student's final checkpoint beside it
                                               (predictions, scores, report.md + chart,
                                               compare/comparison.md: student beside teacher)

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

# Demo size: benchmark scenes (6 questions each) and the student's run (a few dozen samples, so
# the student's accuracy moves little from chance: the demo shows the pipeline, not the method).
TRAIN_SCENES, HELDOUT_SCENES = 8, 8
STEPS, LR, MICRO_BATCH = 24, 1e-3, 4


def run(args: list[str], cwd: Path) -> None:
    click.echo(click.style(f"$ {' '.join(shlex.quote(a) for a in args)}", bold=True))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        sys.exit(f"demo: step failed (exit {p.returncode}): {' '.join(args)}")
    click.echo(f"  ({time.perf_counter() - t0:.1f} s)\n")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), help="Demo folder.")
@click.option("--steps", default=STEPS, show_default=True, help="Optimizer steps of the demo training run.")
def main(out: Path, steps: int) -> None:
    from drivekd.demo.benchmark import STUDENT_DIR, TEACHER_DIR, make_benchmark, summary_line

    for ckpt in (TEACHER_DIR, STUDENT_DIR):
        if not (ckpt / "model.safetensors").is_file():
            sys.exit(f"demo: the checkpoint in {ckpt} is missing; rebuild both with python tools/train_teacher.py "
                     f"--out {TEACHER_DIR} --student-out {STUDENT_DIR}")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    data = out / "data"
    if not (data / "benchmark.json").is_file():
        click.echo(summary_line(make_benchmark(data, seed=0, train=TRAIN_SCENES, val=0, heldout=HELDOUT_SCENES)))
    teacher = TEACHER_DIR
    (out / "drivekd.toml").write_text(
        "# Written by `make demo`: every drivekd command reads its defaults from here.\n"
        f'[data]\ntrain = "data/train.json"\nimages = "data"\neval = "data/heldout_drivebench.json"\n\n'
        f'[teachers]\nperception = "{teacher}"\nreasoning = "{teacher}"\nplanning = "{teacher}"\n\n'
        f'[cache]\nout = "cache"\n\n'
        f'[train]\nstudent = "{STUDENT_DIR}"\ncache = "cache"\nrecipe = "multi"\nprojection = "agp"\n'
        f"lr = {LR}\nmicro_batch = {MICRO_BATCH}\ngrad_accum = 1\nmax_steps = {steps}\nsave_every = {max(1, steps // 3)}\n"
        "num_workers = 1\n"
    )
    cfg = str(out / "drivekd.toml")
    run(["drivekd.cli.cache", "build", "--config", cfg, "--teacher", "all"], out)
    run(["drivekd.cli.cache", "info", "cache"], out)
    run(["drivekd.cli.train", "--config", cfg, "--out", "runs/multi-agp", "--resume"], out)
    run(["drivekd.cli.report", "runs/multi-agp", "--out", "runs/report"], out)  # losses, weights, gradient conflict
    # The teacher on the held-out scenes first, so the student's report shows it alongside.
    run(["drivekd.cli.eval", "--model", str(teacher), "--data", "data/heldout_drivebench.json", "--images", "data",
         "--out", "eval/teacher", "--name", "trained tiny teacher", "--max-new-tokens", "10"], out)
    run(["drivekd.cli.eval", "--model", "runs/multi-agp/final", "--data", "data/heldout_drivebench.json", "--images", "data",
         "--out", "eval/multi-agp", "--name", "multi-agp (tiny demo student)", "--max-new-tokens", "10", "--deploy",
         "--compare", "eval/teacher"], out)
    report = out / "eval" / "multi-agp" / "report.md"
    click.echo(report.read_text() if report.is_file() else "no report written")
    comparison = out / "eval" / "multi-agp" / "compare" / "comparison.md"  # student beside the teacher
    if comparison.is_file():
        click.echo(comparison.read_text())
    click.echo(f"demo done: {out}")


if __name__ == "__main__":
    main()
