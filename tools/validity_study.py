"""Validity study (issue 15): does distilling a trained teacher's attention beat fine-tuning alone?

    python -m drivekd.demo.benchmark --out bench/ --seed 0 --train N --val N --heldout N
    python tools/validity_study.py --teacher drivekd/demo/teacher --benchmark bench/ --out study/ [--seeds 3]
    python tools/validity_study.py ... --quick          # a few steps on a handful of samples (CI)

A thin driver over drivekd.ablate. The benchmark folder is drivekd.demo.benchmark's: train.json (Drive-KD
format) and val / heldout in DriveBench format (val_drivebench.json, heldout_drivebench.json; plain
val.json / heldout.json are read too), disjoint by scene, image paths relative to the folder. The study

1. takes a small, capability-balanced training subset (--train-samples) -> OUT/data/train.json,
2. builds one teacher store from it with the teacher in all three roles (drivekd-cache build),
3. writes OUT/validity.toml, an ablation file: CE on each capability split and on all samples,
   each single-teacher recipe, multi-teacher with none / G1 / G2 / AGP; every run from the same
   student initialisation, at each seed,
4. runs it (drivekd-ablate: train, evaluate on the held-out split, resumable), and writes
   OUT/report.{md,json,png} in the Table-4 layout (mean ± std over seeds) and OUT/study.json
   (settings, wall time, the command).

Tune on the validation split only (--eval-split val); the held-out split is for the final table.
Rerunning the same command resumes; `drivekd-ablate --config OUT/validity.toml --report-only`
rewrites the report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

# File names per split, first found wins: drivekd.demo.benchmark writes {split}.json (Drive-KD format,
# for training) and {split}_drivebench.json (DriveBench format, letter answers, for drivekd-eval).
TRAIN_FILES = ("train.json",)
EVAL_FILES = {"val": ("val_drivebench.json", "val.json"), "heldout": ("heldout_drivebench.json", "heldout.json")}
CAPS = ("perception", "reasoning", "planning")


def split_file(benchmark: Path, split: str) -> Path:
    names = TRAIN_FILES if split == "train" else EVAL_FILES[split]
    for name in names:
        if (benchmark / name).is_file():
            return benchmark / name
    from drivekd.errors import ConfigError

    raise ConfigError(f"--benchmark {benchmark}: no {split} split ({' or '.join(names)}); generate the benchmark with "
                      "`python -m drivekd.demo.benchmark --out DIR ...` (train / val / heldout, disjoint by scene)")


def balanced_subset(samples: list, n: int | None) -> list:
    """The first samples of each capability in turn (round robin), so a small subset holds all three."""
    if n is None or n >= len(samples):
        return list(samples)
    by_cap = {c: [s for s in samples if s.capability == c] for c in CAPS}
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_cap.values()):
        out += [by_cap[c][i] for c in CAPS if i < len(by_cap[c])][: n - len(out)]
        i += 1
    return out


def _image_set(samples) -> set[str]:
    return {str(p) for s in samples for p in s.images}


def study_toml(*, seeds: list[int], eval_data: Path, images: Path, student: Path, data: Path, cache: Path,
               steps: int | None, epochs: int, lr: float, grad_accum: int, micro_batch: int, max_new_tokens: int,
               eval_limit: int | None, num_workers: int, eval_batch_size: int = 16) -> str:
    """The ablation file of the study (Table-4 rows the issue asks for)."""
    q = json.dumps  # TOML basic strings are JSON strings
    head = [
        "# Written by tools/validity_study.py: rerun it (or drivekd-ablate --config this file) to resume.",
        "[ablation]",
        'title = "Validity study: trained tiny teacher, students from one initialisation (held-out accuracy)"',
        f"seeds = {seeds}",
        f"eval_data = {q(str(eval_data))}",
        f"eval_images = {q(str(images))}",
        f"max_new_tokens = {max_new_tokens}",
        f"eval_batch_size = {eval_batch_size}",
        "project = false",
        *([f"eval_limit = {eval_limit}"] if eval_limit else []),
        "",
        "[base]",
        f"student = {q(str(student))}",
        f"data = {q(str(data))}",
        f"images = {q(str(images))}",
        f"cache = {q(str(cache))}",
        f"lr = {lr!r}",
        f"epochs = {epochs}",
        *([f"max_steps = {steps}"] if steps else []),
        f"grad_accum = {grad_accum}",
        f"micro_batch = {micro_batch}",
        f"num_workers = {num_workers}",
        "save_every = 50",
        "keep_last = 1",
        "progress = false",
        'report_to = "none"',
        "",
    ]
    runs = []
    for cap in CAPS:
        runs.append(dict(name=f"ce-{cap}", row="CE", report=[cap], recipe="sft", split=cap))
    runs.append(dict(name="ce-all", row="CE (all samples)", recipe="sft"))
    for cap in CAPS:
        runs.append(dict(name=f"single-{cap}", row="Ours (single-teacher)", report=[cap], recipe=cap))
    for proj, row in (("none", "Multi-teacher"), ("g1", "Multi-teacher (G1)"), ("g2", "Multi-teacher (G2)"),
                      ("agp", "Ours (multi-teacher)")):
        runs.append(dict(name=f"multi-{proj}", row=row, recipe="multi", projection=proj))
    body = []
    for r in runs:
        body.append("[[runs]]")
        body += [f"{k} = {json.dumps(v)}" for k, v in r.items()]
        body.append("")
    return "\n".join(head + body)


def run_study(teacher: Path, student: Path | None, benchmark: Path, out: Path, *, seeds: list[int], train_samples: int | None,
              steps: int | None, epochs: int = 3, lr: float = 5e-4, grad_accum: int = 4, micro_batch: int = 1,
              max_new_tokens: int = 24, eval_split: str = "heldout", eval_limit: int | None = None,
              eval_batch_size: int = 16, num_workers: int = 0, device: str | None = None) -> dict:
    """Build the store, write and run the study's ablation; returns study.json's content."""
    import torch

    from drivekd.ablate import load_ablation, run_ablation
    from drivekd.data.loaders import load_samples
    from drivekd.errors import ConfigError
    from drivekd.teacher.build import BuildConfig, build

    t0 = time.perf_counter()
    benchmark, out = benchmark.resolve(), out.resolve()
    if student is None:  # the tiny demo student config (same family and processor as the demo teacher), fixed seed
        from drivekd.demo.tiny_models import make_internvl

        student = out / "student-init"
        if not (student / "config.json").is_file():
            make_internvl(student, "student", seed=1001)
    for flag, p in (("--teacher", teacher), ("--student", student), ("--benchmark", benchmark)):
        if not Path(p).is_dir():
            raise ConfigError(f"{flag} {p} is not a folder")
    train_all = load_samples(split_file(benchmark, "train"), benchmark, check_images=False)
    eval_path = split_file(benchmark, eval_split)
    evaluated = load_samples(eval_path, benchmark, check_images=False)
    shared = _image_set(train_all) & _image_set(evaluated)
    if shared:
        raise ConfigError(f"--benchmark {benchmark}: the {eval_split} split shares {len(shared)} image(s) with train "
                          f"(e.g. {sorted(shared)[0]}); the splits must be disjoint by scene")
    subset = balanced_subset(train_all, train_samples)
    ids = {s.id for s in subset}
    records = json.loads(split_file(benchmark, "train").read_text(encoding="utf-8"))
    chosen = [rec for rec, s in zip(records, train_all) if s.id in ids]
    data = out / "data" / "train.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(chosen, indent=1) + "\n"
    if not data.is_file() or data.read_text(encoding="utf-8") != text:
        if data.is_file():
            raise ConfigError(f"{data} holds another training subset (other --train-samples or benchmark); use another --out")
        data.write_text(text, encoding="utf-8")

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_store = time.perf_counter()
    build(BuildConfig(teachers={c: Path(teacher) for c in CAPS}, data=data, images=benchmark, out=out / "cache",
                      device=dev, dtype="bfloat16" if dev.startswith("cuda") else "float32", progress=False))
    store_seconds = time.perf_counter() - t_store

    toml = out / "validity.toml"
    toml.write_text(study_toml(seeds=seeds, eval_data=eval_path, images=benchmark, student=Path(student).resolve(),
                               data=data, cache=out / "cache", steps=steps, epochs=epochs, lr=lr, grad_accum=grad_accum,
                               micro_batch=micro_batch, max_new_tokens=max_new_tokens, eval_limit=eval_limit,
                               num_workers=num_workers, eval_batch_size=eval_batch_size), encoding="utf-8")
    abl = load_ablation(toml, out=out)  # project = false in the file: a ./drivekd.toml must not change the study
    result = run_ablation(abl)
    study = {
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("validity_study.py") else None,
        "teacher": str(teacher), "student": str(student), "benchmark": str(benchmark), "eval_split": eval_split,
        "eval_records": len(evaluated) if eval_limit is None else min(eval_limit, len(evaluated)),
        "train_samples": len(subset), "train_capabilities": {c: sum(s.capability == c for s in subset) for c in CAPS},
        "seeds": seeds, "steps": steps, "epochs": epochs, "lr": lr, "grad_accum": grad_accum, "micro_batch": micro_batch,
        "store_seconds": round(store_seconds, 1), "ablation_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1), "failed": [f"{o.key}: {o.error}" for o in result.failed],
        "report": str(out / "report.md"),
    }
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    with (out / "report.md").open("a", encoding="utf-8") as fh:
        fh.write(f"Study wall time: {study['wall_seconds']:.1f} s (store {study['store_seconds']:.1f} s, "
                 f"training + evaluation {study['ablation_seconds']:.1f} s); {study['train_samples']} training samples "
                 f"{study['train_capabilities']}, {study['eval_records']} {eval_split} records.\n")
    return study


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--teacher", type=click.Path(path_type=Path), required=True, help="Trained teacher checkpoint (all three roles).")
@click.option("--student", type=click.Path(path_type=Path), default=None, help="Student initialisation (same family, smaller); every run starts from it. Default: the tiny demo InternVL student config (OUT/student-init, seed 1001).")
@click.option("--benchmark", type=click.Path(path_type=Path), required=True, help="Folder with train.json, val.json, heldout.json and their images.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("validity-study"), show_default=True)
@click.option("--seeds", type=int, default=None, help="Seeds per run: 1..N (default 3; --quick: 1).")
@click.option("--train-samples", type=int, default=None, help="Capability-balanced training subset (default 300, a small training split as the "
              "issue asks, sized so 11 runs x 3 seeds fit in about an hour here; --quick: 6; 0: the whole train split).")
@click.option("--steps", type=int, default=None, help="Optimizer steps per run (default: --epochs over the subset; --quick: 1).")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Tiny students learn at a larger lr than the paper's 5e-5.")
@click.option("--grad-accum", type=int, default=4, show_default=True)
@click.option("--micro-batch", type=int, default=1, show_default=True)
@click.option("--max-new-tokens", type=int, default=24, show_default=True)
@click.option("--eval-split", type=click.Choice(["heldout", "val"]), default="heldout", show_default=True, help="val for any tuning; heldout for the table.")
@click.option("--eval-limit", type=int, default=None, help="Evaluate only the first N records (--quick: 6).")
@click.option("--eval-batch-size", type=int, default=16, show_default=True, help="Questions per generation batch.")
@click.option("--quick", is_flag=True, help="CI check of the pipeline: 1 seed, 1 step, 6 training samples, 6 evaluated records.")
def main(teacher, student, benchmark, out, seeds, train_samples, steps, epochs, lr, grad_accum, micro_batch, max_new_tokens,
         eval_split, eval_limit, eval_batch_size, quick) -> None:
    """Train students with CE, single-teacher and multi-teacher recipes over seeds; Table-4 layout report."""
    from drivekd.errors import DriveKDError

    if quick:
        seeds = seeds or 1
        train_samples = train_samples or 6
        steps, grad_accum = steps or 1, 1
        eval_limit = eval_limit or 6
        max_new_tokens = min(max_new_tokens, 8)
    elif train_samples is None:
        train_samples = 300
    train_samples = train_samples or None  # 0: the whole train split
    try:
        study = run_study(teacher, student, benchmark, out, seeds=list(range(1, (seeds or 3) + 1)),
                          train_samples=train_samples, steps=steps, epochs=epochs, lr=lr, grad_accum=grad_accum,
                          micro_batch=micro_batch, max_new_tokens=max_new_tokens, eval_split=eval_split, eval_limit=eval_limit,
                          eval_batch_size=eval_batch_size)
    except DriveKDError as e:
        click.echo(f"validity_study: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    click.echo((out / "report.md").read_text(encoding="utf-8"))
    if study["failed"]:
        click.echo("failed jobs: " + "; ".join(study["failed"]), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
