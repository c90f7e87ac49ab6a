"""Train the tiny demo teacher on the synthetic benchmark, reproducibly from a seed.

    python tools/train_teacher.py --out drivekd/demo/teacher [--seed 0] [--steps 1500] [--quick]

Steps (each the real tool a user runs):
  1. the benchmark (drivekd.demo.benchmark) into WORK/bench, unless --bench points at one;
  2. a fresh tiny InternVL teacher (drivekd.demo.tiny_models, seed --seed) in WORK/init;
  3. drivekd-train --recipe sft (plain answer CE, no store) on the benchmark's train split;
  4. drivekd-eval on the val split (the only split used to choose settings) and on the held-out split;
  5. the final checkpoint's model/config/tokenizer/processor files and training_record.json into --out.
With --student-out, also a "format-pretrained" tiny student (drivekd.demo.tiny_models student
config): drivekd-train --recipe sft on the train questions with random answer letters
(benchmark.format_only_split), so it answers in the template at chance, knowing nothing of the
images, like a pretrained VLM before driving data. `make demo` distils the teacher into it.

The record holds the seed, the exact commands, steps, wall times, and the per-capability accuracy
on val and held-out next to the prior (always answering the most common training letter of each
question kind). The run fails (exit 1) when the teacher does not beat the prior on every capability
of the val split, unless --quick (a pipeline check: a few steps, a few samples) or --allow-weak.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

CAPS = ("perception", "reasoning", "planning")
# What a checkpoint needs to load for drivekd-cache / drivekd-eval (trainer state and markers stay behind).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
BEAT_MARGIN = 5.0  # points above the prior that count as "clearly beats chance" on val


def _run(args: list[str], threads: int, log: list[dict]) -> float:
    """Run `python -m ARGS` with HF offline and `threads` torch threads; returns the wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", *args]
    click.echo(click.style("$ " + " ".join(shlex.quote(a) for a in ["python", "-m", *args]), bold=True), err=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise click.ClickException(f"step failed (exit {p.returncode}): python -m {' '.join(args)}")
    log.append({"command": "python -m " + " ".join(shlex.quote(a) for a in args), "wall_s": round(wall, 1)})
    return wall


def accuracies(report_json: Path) -> dict[str, float | None]:
    """Per-capability multiple-choice accuracy (%) from a drivekd-eval report.json."""
    caps = json.loads(report_json.read_text())["capabilities"]
    return {c: (caps[c]["mcq_accuracy"] if c in caps else None) for c in CAPS}


def _copy_checkpoint(final: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        shutil.copy2(final / name, out / name)


def train_format_student(out: Path, work: Path, bench: Path, *, seed: int, steps: int, lr: float, micro_batch: int,
                         threads: int, vision_from: Path | None = None) -> dict:
    """A tiny student trained on random answer letters: the template without the task (see the docstring).
    With `vision_from` (a teacher checkpoint), its vision tower and projector LayerNorm are then grafted
    in (drivekd.demo.tiny_models.graft_vision): a student that can see, as real students can."""
    from drivekd.demo.benchmark import format_only_split
    from drivekd.demo.tiny_models import graft_vision, make_internvl

    log: list[dict] = []
    data = bench / "train_format_only.json"
    data.write_text(json.dumps(format_only_split(json.loads((bench / "train.json").read_text()), seed), indent=1) + "\n")
    init = work / "student-init"
    shutil.rmtree(init, ignore_errors=True)
    make_internvl(init, "student", seed=seed + 1)
    run = work / "student-run"
    shutil.rmtree(run, ignore_errors=True)
    wall = _run(["drivekd.cli.train", "--recipe", "sft", "--student", str(init), "--data", str(data), "--images", str(bench),
                 "--out", str(run), "--seed", str(seed), "--lr", str(lr), "--max-steps", str(steps), "--micro-batch",
                 str(micro_batch), "--grad-accum", "1", "--warmup-ratio", "0.03", "--save-every", "0", "--num-workers", "1",
                 "--device", "cpu", "--dtype", "float32", "--no-progress", "--report-to", "none"], threads, log)
    ev = work / "student-eval-val"
    _run(["drivekd.cli.eval", "--model", str(run / "final"), "--data", str(bench / "val_drivebench.json"), "--images",
          str(bench), "--out", str(ev), "--max-new-tokens", "10", "--batch-size", "32"], threads, log)
    _copy_checkpoint(run / "final", out)
    grafted = graft_vision(out, vision_from, out) if vision_from is not None else []
    report = json.loads((ev / "report.json").read_text())
    record = {
        "what": "tiny InternVL student (drivekd.demo.tiny_models student config) trained with answer CE on the "
                "benchmark's train questions with uniformly random answer letters: it answers in the template, at chance",
        "seed": seed, "steps": steps, "micro_batch": micro_batch, "lr": lr, "train_wall_s": round(wall, 1),
        "val_accuracy": accuracies(ev / "report.json"),
        "val_unanswerable": report["unanswerable"]["count"],
        "command": "python tools/train_teacher.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "steps_run": log,
    }
    if vision_from is not None:
        record["vision_grafted_from"] = {"teacher": str(vision_from), "tensors": len(grafted),
                                         "note": "val_accuracy is of the student before the graft"}
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def train_teacher(out: Path, work: Path, *, seed: int, steps: int, lr: float, micro_batch: int, bench: Path | None,
                  bench_scenes: tuple[int, int, int], eval_limit: int | None, threads: int, quick: bool,
                  allow_weak: bool, init_from: Path | None = None) -> dict:
    from drivekd.demo.benchmark import make_benchmark
    from drivekd.demo.tiny_models import make_internvl

    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    if bench is None:
        bench = work / "bench"
        n_train, n_val, n_held = bench_scenes
        if not (bench / "benchmark.json").is_file():
            make_benchmark(bench, seed, train=n_train, val=n_val, heldout=n_held)
        bench_cmd = f"python -m drivekd.demo.benchmark --out {bench} --seed {seed} --train {n_train} --val {n_val} --heldout {n_held}"
    else:
        bench_cmd = None
    if not (bench / "benchmark.json").is_file():
        raise click.ClickException(f"--bench {bench}: no benchmark.json; write one with python -m drivekd.demo.benchmark")
    bench_info = json.loads((bench / "benchmark.json").read_text())

    init = work / "init"
    shutil.rmtree(init, ignore_errors=True)
    if init_from is None:
        make_internvl(init, "teacher", seed=seed)
    else:  # a second stage: continue from an earlier teacher (its record is kept as "previous_stage")
        _copy_checkpoint(init_from, init)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    train_args = ["drivekd.cli.train", "--recipe", "sft", "--student", str(init), "--data", str(bench / "train.json"),
                  "--images", str(bench), "--out", str(run), "--seed", str(seed), "--lr", str(lr),
                  "--max-steps", str(steps), "--micro-batch", str(micro_batch), "--grad-accum", "1",
                  "--warmup-ratio", "0.03", "--save-every", "0", "--num-workers", "1", "--device", "cpu",
                  "--dtype", "float32", "--no-progress", "--report-to", "none"]
    train_wall = _run(train_args, threads, log)
    final = run / "final"

    results: dict[str, dict] = {}
    for split in ("val",) if quick else ("val", "heldout"):  # --quick checks the pipeline: one eval is enough
        data = bench / f"{split}_drivebench.json"
        if not json.loads(data.read_text()):
            continue
        ev = work / f"eval-{split}"
        args = ["drivekd.cli.eval", "--model", str(final), "--data", str(data), "--images", str(bench), "--out", str(ev),
                "--name", f"tiny teacher ({split})", "--max-new-tokens", "10", "--batch-size", "32"]
        if eval_limit:
            args += ["--limit", str(eval_limit)]
        _run(args, threads, log)
        results[split] = accuracies(ev / "report.json")

    previous = None
    if init_from is not None and (init_from / "training_record.json").is_file():
        previous = json.loads((init_from / "training_record.json").read_text())
    _copy_checkpoint(final, out)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    prior = {s: {c: bench_info["per_capability"][s][c]["prior_accuracy"] for c in CAPS} for s in ("val", "heldout")}
    weak = [c for c in CAPS if "val" in results
            and (results["val"][c] is None or results["val"][c] < prior["val"][c] + BEAT_MARGIN)]
    record = {
        "what": "tiny InternVL teacher (drivekd.demo.tiny_models teacher config) trained with plain answer CE "
                "(drivekd-train --recipe sft) on the synthetic benchmark's train split",
        "seed": seed,
        "steps": steps,
        "micro_batch": micro_batch,
        "lr": lr,
        "samples_seen": steps * micro_batch,
        "train_questions": bench_info["questions"]["train"],
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "accuracy": results,
        "prior_accuracy": prior,
        "prior_letter": bench_info["prior_letter"],
        "beats_prior_by_5_points_on_val": not weak,
        "heldout_questions": {c: bench_info["per_capability"]["heldout"][c]["questions"] for c in CAPS},
        "heldout_binomial_std": bench_info["heldout_binomial_std"],
        "eval_limit": eval_limit,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "threads": threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "benchmark": {"command": bench_cmd, "seed": bench_info["seed"], "scenes": bench_info["scenes"]},
        "command": "python tools/train_teacher.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "steps_run": log,
        "init_from": str(init_from) if init_from else None,
        "previous_stage": previous,
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    if weak and not (quick or allow_weak):
        raise click.ClickException(f"the teacher does not beat the prior by {BEAT_MARGIN} points on val for: "
                                   f"{', '.join(weak)} (see {out / 'training_record.json'}); train longer (--steps)")
    record["bench"] = str(bench)
    return record


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the trained checkpoint and training_record.json (e.g. drivekd/demo/teacher).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch folder for the benchmark, the init checkpoint, the run and the evals (default: OUT.work).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the benchmark, the init weights and the run.")
@click.option("--steps", default=1500, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--lr", default=2e-3, show_default=True, type=float, help="Peak learning rate (cosine schedule).")
@click.option("--micro-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Samples per step.")
@click.option("--bench", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An existing benchmark folder (default: write one into WORK/bench from --seed).")
@click.option("--bench-scenes", default=(600, 100, 300), show_default=True, type=(int, int, int),
              help="Train, val, held-out scenes of the benchmark written when --bench is not given.")
@click.option("--eval-limit", default=None, type=int, help="Evaluate only the first N questions of each split.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="Torch threads.")
@click.option("--quick", is_flag=True, help="Pipeline check: 4 train scenes, 4 steps, 12 val questions, no held-out eval (does not check accuracy).")
@click.option("--allow-weak", is_flag=True, help="Write the checkpoint even if it does not beat the prior on val.")
@click.option("--student-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the format-pretrained tiny student here (e.g. drivekd/demo/student).")
@click.option("--student-steps", default=300, show_default=True, type=click.IntRange(min=1),
              help="Optimizer steps of the format-pretrained student.")
@click.option("--init-from", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue from this teacher checkpoint (a second stage) instead of a fresh init from --seed.")
@click.option("--student-only", is_flag=True, help="Only (re)build the student (from the benchmark in WORK/bench or --bench).")
@click.option("--student-vision-from", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Graft this teacher's vision tower and projector LayerNorm into the student (default with "
                   "--student-out: OUT, the teacher just trained; with --student-only: none unless given).")
def main(out: Path, work: Path | None, seed: int, steps: int, lr: float, micro_batch: int, bench: Path | None,
         bench_scenes: tuple[int, int, int], eval_limit: int | None, threads: int, quick: bool, allow_weak: bool,
         student_out: Path | None, student_steps: int, student_only: bool, init_from: Path | None,
         student_vision_from: Path | None) -> None:
    if quick:
        steps, micro_batch, bench_scenes, eval_limit = min(steps, 4), min(micro_batch, 4), (4, 2, 2), 12
    work = work or out.with_name(out.name + ".work")
    if student_only:
        if student_out is None:
            raise click.ClickException("--student-only needs --student-out DIR")
        srec = train_format_student(student_out, work, bench or work / "bench", seed=seed, steps=student_steps, lr=lr,
                                    micro_batch=micro_batch, threads=threads, vision_from=student_vision_from)
        click.echo(f"student: val accuracy {srec['val_accuracy']} (unanswerable {srec['val_unanswerable']}) -> {student_out}")
        return
    rec = train_teacher(out, work, seed=seed, steps=steps, lr=lr, micro_batch=micro_batch, bench=bench,
                        bench_scenes=bench_scenes, eval_limit=eval_limit, threads=threads, quick=quick,
                        allow_weak=allow_weak, init_from=init_from)
    for split, acc in rec["accuracy"].items():
        click.echo(f"{split}: accuracy {acc} | prior {rec['prior_accuracy'][split]}")
    click.echo(f"trained in {rec['train_wall_s']} s ({rec['steps']} steps, {rec['threads']} thread(s)); "
               f"total {rec['total_wall_s']} s -> {out}")
    if student_out is not None:
        srec = train_format_student(student_out, work, Path(rec["bench"]), seed=seed, steps=student_steps, lr=lr,
                                    micro_batch=micro_batch, threads=threads, vision_from=student_vision_from or out)
        click.echo(f"student: val accuracy {srec['val_accuracy']} (unanswerable {srec['val_unanswerable']}) -> {student_out}")


if __name__ == "__main__":
    main()
