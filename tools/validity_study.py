"""Validity study v2 (issue 22): does distilling the trained teacher's attention beat fine-tuning alone?

    python -m drivekd.demo.benchmark --out bench/ --seed 0 --train 600 --val 100 --heldout 300
    python tools/validity_study.py --teacher drivekd/demo/teacher --student drivekd/demo/student \\
        --benchmark bench/ --out study/ --part perception-100        # one resumable part (<= ~90 min, 1 thread)
    python tools/validity_study.py ... --part perception-400@0.001   # one lr of a part (halves a long part)
    python tools/validity_study.py ... --list-parts                  # the parts, their runs and job counts
    python tools/validity_study.py ... --part report                 # only rewrite study/report.md + study.json
    python tools/validity_study.py ... --quick                       # tiny sizes, 2 steps, 2 seeds (CI)

A thin driver over drivekd.ablate. The benchmark folder is drivekd.demo.benchmark's (train.json, and
val / heldout in DriveBench format, disjoint by scene). The study is cut into PARTS, each an ablation
file OUT/parts/PART/ablation.toml run by drivekd-ablate's runner (resumable per run and seed):

  perception-N    perception split, first N questions: CE | KD-paper (MSE, paper weights: the control) |
                  KD-cos (--loss cosine: a usable scale)
  variants-N      the same data: KD-cos at the teacher's lamp-focused layers (--layers L-3..L-2: student
                  layers 1, 2 <- teacher layers 3, 4), and the calibrated-MSE slot (--calibrated-arm)
  multi-ce, multi-none, multi-g1, multi-g2, multi-agp
                  a capability-balanced subset (--multi-samples): CE on all samples | the multi-teacher
                  recipe with each gradient-conflict rule (reasoning full maps: full_reduction "entries",
                  the authors' T x T mean)

Every arm is trained at each learning rate of --lrs and each seed, checkpointed every --save-every
steps; every checkpoint is evaluated on VAL. Per arm, the (lr, step) with the best mean val accuracy
over seeds is chosen once all its jobs are in (ties: the earlier step, then the smaller lr); only then
is that checkpoint of every seed evaluated on HELD-OUT, once (a later different choice is refused).
OUT/report.md gathers every part: chosen settings, held-out mean ± std, and per seed paired differences
to CE of the same data (same seed) with a 95% t-interval over seeds. Parts not yet complete are shown
as val progress only. Rerunning a part resumes it; nothing is ever chosen on held-out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

# File names per split, first found wins: drivekd.demo.benchmark writes {split}.json (Drive-KD format,
# for training) and {split}_drivebench.json (DriveBench format, letter answers, for drivekd-eval).
TRAIN_FILES = ("train.json",)
EVAL_FILES = {"val": ("val_drivebench.json", "val.json"), "heldout": ("heldout_drivebench.json", "heldout.json")}
CAPS = ("perception", "reasoning", "planning")

# Perception arms: TrainConfig keys on top of [base]. "kd-paper" keeps every paper default (MSE, weight 1,
# online re-weighting): the control that issue 22 measured at 0.1-0.5% of CE's gradient.
PERCEPTION_ARMS = {
    "ce": {"recipe": "sft", "split": "perception"},
    "kd-paper": {"recipe": "perception"},
    "kd-cos": {"recipe": "perception", "loss": "cosine"},
}
# The teacher's lamp-focused layers (issue 22: text-to-vision share on the lit lamp 0.105 at layer 3,
# 0.097-0.136 at layer 4, vs 0.069 at the perception recipe's layer 0). One spec resolves against each
# model's depth: "L-3..L-2" is teacher layers 3, 4 (L=6) and student layers 1, 2 (L=4), paired 1<-3, 2<-4.
LAMP_LAYERS = "L-3..L-2"
VARIANT_ARMS = {"kd-cos-l34": {"recipe": "perception", "loss": "cosine", "layers": LAMP_LAYERS}}
# SLOT: KD with calibrated MSE (issue 22, built as a new drivekd-train flag by another change). Enable it
# with --calibrated-arm 'KEY=VALUE,...' (TrainConfig keys, e.g. the new flag's name with underscores);
# it then joins every variants-N part as arm "kd-mse-calibrated" (recipe perception, MSE).
CALIBRATED_ARM = "kd-mse-calibrated"
MULTI_ARMS = {
    "ce": {"recipe": "sft"},
    "none": {"recipe": "multi", "projection": "none", "full_reduction": "entries"},
    "g1": {"recipe": "multi", "projection": "g1", "full_reduction": "entries"},
    "g2": {"recipe": "multi", "projection": "g2", "full_reduction": "entries"},
    "agp": {"recipe": "multi", "projection": "agp", "full_reduction": "entries"},
}
# Store layers of the perception teacher: the recipe's layer 0 and the lamp-focused 3, 4 (teacher L=6).
PERCEPTION_STORE_LAYERS = "0,L-3..L-2"

# Two-sided 95% Student-t quantiles t_{0.975, df} (no scipy in the toolchain).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


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


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class Part:
    """One resumable piece of the study: an ablation file of arms x lrs, run over the seeds."""

    name: str
    kind: str  # "perception" (perception split, scored on perception) | "multi" (all three capabilities)
    size: int  # training questions
    arms: dict[str, dict[str, Any]]  # arm -> TrainConfig keys
    ce_part: str  # the part holding this part's CE arm (paired differences)

    @property
    def caps(self) -> tuple[str, ...]:
        return ("perception",) if self.kind == "perception" else CAPS


@dataclass
class Plan:
    sizes: tuple[int, ...]
    multi_samples: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    save_every: int
    micro_batch: int
    calibrated: dict[str, Any] | None = None
    eval_limit: int | None = None  # --quick only: evaluate the first N records of val / held-out
    parts: dict[str, Part] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n in self.sizes:
            self.parts[f"perception-{n}"] = Part(f"perception-{n}", "perception", n, dict(PERCEPTION_ARMS), f"perception-{n}")
        for n in self.sizes:
            arms = dict(VARIANT_ARMS)
            if self.calibrated:
                arms[CALIBRATED_ARM] = {"recipe": "perception", **self.calibrated}
            self.parts[f"variants-{n}"] = Part(f"variants-{n}", "perception", n, arms, f"perception-{n}")
        for arm, keys in MULTI_ARMS.items():
            self.parts[f"multi-{arm}"] = Part(f"multi-{arm}", "multi", self.multi_samples, {arm: keys}, "multi-ce")

    def jobs(self, part: Part) -> int:
        return len(part.arms) * len(self.lrs) * len(self.seeds)


def run_name(arm: str, lr: float) -> str:
    return f"{arm}-lr{lr:g}"


def parse_keys(text: str | None) -> dict[str, Any] | None:
    """'key=value,key=value' -> TrainConfig keys, values read as JSON where they parse (1e-3, true, "x")."""
    from drivekd.errors import ConfigError

    if not text:
        return None
    out: dict[str, Any] = {}
    for item in text.split(","):
        if "=" not in item:
            raise ConfigError(f"--calibrated-arm: {item!r} is not KEY=VALUE (e.g. --calibrated-arm calibrate=0.5)")
        k, v = (s.strip() for s in item.split("=", 1))
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def part_toml(plan: Plan, part: Part, *, eval_data: Path, images: Path, student: Path, data: Path, cache: Path,
              max_new_tokens: int, eval_batch_size: int) -> str:
    """The ablation file of one part: every arm at every lr, [ablation].seeds, evaluated on val (final step)."""
    q = json.dumps  # TOML basic strings are JSON strings
    head = [
        "# Written by tools/validity_study.py (study v2): rerun it with --part, or drivekd-ablate --config this file.",
        "[ablation]",
        f"title = {q(f'Validity study v2, part {part.name}: val accuracy of the final checkpoints (selection only)')}",
        f"seeds = {list(plan.seeds)}",
        f"eval_data = {q(str(eval_data))}",
        f"eval_images = {q(str(images))}",
        f"max_new_tokens = {max_new_tokens}",
        f"eval_batch_size = {eval_batch_size}",
        "project = false",
        *([f"eval_limit = {plan.eval_limit}"] if plan.eval_limit else []),
        "",
        "[base]",
        f"student = {q(str(student))}",
        f"data = {q(str(data))}",
        f"images = {q(str(images))}",
        f"cache = {q(str(cache))}",
        f"max_steps = {plan.steps}",
        f"micro_batch = {plan.micro_batch}",
        "grad_accum = 1",
        "num_workers = 0",
        f"save_every = {plan.save_every}",
        # every checkpoint stays, as each is evaluated on val for the stopping step
        f"keep_last = {plan.steps // plan.save_every + 1}",
        "progress = false",
        'report_to = "none"',
        "",
    ]
    body = []
    for arm, keys in part.arms.items():
        for lr in plan.lrs:
            body.append("[[runs]]")
            body += [f"name = {q(run_name(arm, lr))}", f"row = {q(f'{arm} lr={lr:g}')}", f"report = {q(list(part.caps))}",
                     f"lr = {lr!r}"]
            body += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
            body.append("")
    return "\n".join(head + body)


# ------------------------------------------------------------------------------------------- running


@dataclass
class Paths:
    """Where a study keeps everything (one --out)."""

    out: Path

    def part(self, name: str) -> Path:
        return self.out / "parts" / name

    def val_step(self, part: str, run: str, seed: int, step: int) -> Path:
        return self.part(part) / "val-steps" / run / f"seed-{seed}" / f"step-{step:06d}"

    def heldout(self, part: str, arm: str, seed: int) -> Path:
        return self.part(part) / "heldout" / arm / f"seed-{seed}"

    def choice(self, part: str, arm: str) -> Path:
        return self.part(part) / "heldout" / arm / "choice.json"


def _filter_records(src: Path, dst: Path, caps: tuple[str, ...]) -> Path:
    """A DriveBench file holding only the records of these capabilities (perception parts score one)."""
    from drivekd.eval.score import capability_of

    records = json.loads(src.read_text(encoding="utf-8"))
    keep = [r for r in records if capability_of(r.get("question_type", "")) in caps]
    _write_once(dst, json.dumps(keep, indent=1) + "\n")
    return dst


def _write_once(path: Path, text: str) -> None:
    """Write a derived input; an existing different one means another study lives in this --out."""
    from drivekd.errors import ConfigError

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        if path.read_text(encoding="utf-8") != text:
            raise ConfigError(f"{path} holds other data (another benchmark or size); use another --out")
        return
    path.write_text(text, encoding="utf-8")


def _checkpoints(run_dir: Path, steps: int) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a trained run; final/ stands for the last step."""
    from drivekd.trainer.checkpoint import is_complete, list_checkpoints

    found = {s: p for s, p in list_checkpoints(run_dir)}
    if is_complete(run_dir / "final"):
        found[steps] = run_dir / "final"
    return sorted(found.items())


def _score(report: dict[str, Any], caps: tuple[str, ...]) -> dict[str, float | None]:
    per = {c: report["capabilities"][c]["score"] for c in caps}
    vals = [v for v in per.values() if v is not None]
    return {**per, "average": sum(vals) / len(vals) if len(vals) == len(caps) else None}


def _evaluate(model: Path, data: Path, out_dir: Path, images: Path, max_new_tokens: int, batch: int, name: str,
              image_settings, limit: int | None = None) -> dict[str, Any]:
    from drivekd.eval.report import evaluate_model

    report = out_dir / "report.json"
    if report.is_file():  # evaluated before (a rerun resumes)
        return json.loads(report.read_text(encoding="utf-8"))
    return evaluate_model(model, data, out_dir, images=images, batch_size=batch, max_new_tokens=max_new_tokens,
                          model_name=name, image_settings=image_settings, limit=limit)


def run_part(plan: Plan, part: Part, paths: Paths, *, benchmark: Path, teacher: Path, student: Path,
             val_data: Path, heldout_data: Path, train_data: Path, cache: Path, device: str,
             max_new_tokens: int, eval_batch_size: int, lr: float | None = None, log=print) -> dict[str, Any]:
    """Train + val-evaluate every job of the part (seed by seed, so paired seeds complete together),
    then choose per arm on val and evaluate the choice on held-out once (an arm whose lr grid is not
    complete yet waits). lr: only the runs at this learning rate (--part NAME@LR splits a long part)."""
    from drivekd.ablate import load_ablation, run_ablation, write_ablation_report
    from drivekd.teacher.build import BuildConfig, build

    t0 = time.perf_counter()
    # The store: perception parts read one perception-role store (layers 0 and the lamp layers) over the
    # largest perception size, so every size reads the same targets; multi parts one three-role store.
    if part.kind == "perception":
        build(BuildConfig(teachers={"perception": teacher}, data=train_data, images=benchmark, out=cache,
                          layers={"perception": PERCEPTION_STORE_LAYERS}, device=device, progress=False, writers=1))
    else:
        build(BuildConfig(teachers={c: teacher for c in CAPS}, data=train_data, images=benchmark, out=cache,
                          device=device, progress=False, writers=1))
    data = paths.part(part.name) / "train.json"
    records = json.loads(train_data.read_text(encoding="utf-8"))[: part.size] if part.kind == "perception" else \
        json.loads(train_data.read_text(encoding="utf-8"))
    _write_once(data, json.dumps(records, indent=1) + "\n")

    toml = paths.part(part.name) / "ablation.toml"
    toml.write_text(part_toml(plan, part, eval_data=val_data, images=benchmark, student=student, data=data, cache=cache,
                              max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size), encoding="utf-8")
    abl = load_ablation(toml, out=paths.part(part.name))
    failed: list[str] = []
    runs = [r for r in abl.runs if lr is None or any(r.name == run_name(arm, lr) for arm in part.arms)]
    for seed in plan.seeds:
        one = dataclasses.replace(abl, runs=[dataclasses.replace(r, jobs=[j for j in r.jobs if j.seed == seed]) for r in runs])
        result = run_ablation(one)
        failed += [f"{o.key}: {o.error}" for o in result.failed]
        for r in runs:
            job = next(j for j in r.jobs if j.seed == seed)
            for step, ckpt in _checkpoints(abl.run_dir(job), plan.steps):
                if step == plan.steps:
                    continue  # final/: the runner's own val evaluation (eval/RUN/seed-S/)
                _evaluate(ckpt, val_data, paths.val_step(part.name, r.name, seed, step), benchmark, max_new_tokens,
                          eval_batch_size, f"{r.name} seed {seed} step {step}", job.cfg.image_settings, plan.eval_limit)
        log(f"{part.name}: seed {seed} trained and val-evaluated ({time.perf_counter() - t0:.0f} s so far)")
    write_ablation_report(abl)
    for arm in part.arms:
        choose_and_test(plan, part, arm, paths, abl, heldout_data=heldout_data, benchmark=benchmark,
                        max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size)
    return {"part": part.name, "seconds": round(time.perf_counter() - t0, 1), "failed": failed}


def val_curves(plan: Plan, part: Part, arm: str, paths: Paths) -> dict[float, dict[int, dict[int, dict]]]:
    """{lr: {step: {seed: scores}}} of every val evaluation done so far."""
    curves: dict[float, dict[int, dict[int, dict]]] = {}
    for lr in plan.lrs:
        run = run_name(arm, lr)
        by_step: dict[int, dict[int, dict]] = {}
        for seed in plan.seeds:
            final = paths.part(part.name) / "eval" / run / f"seed-{seed}" / "report.json"
            state = paths.part(part.name) / "state" / f"{run}.seed-{seed}.json"
            if final.is_file() and state.is_file() and json.loads(state.read_text()).get("status") == "done":
                by_step.setdefault(plan.steps, {})[seed] = _score(json.loads(final.read_text()), part.caps)
            vs = paths.part(part.name) / "val-steps" / run / f"seed-{seed}"
            for d in sorted(vs.glob("step-*")) if vs.is_dir() else []:
                if (d / "report.json").is_file():
                    by_step.setdefault(int(d.name[5:]), {})[seed] = _score(json.loads((d / "report.json").read_text()), part.caps)
        curves[lr] = dict(sorted(by_step.items()))
    return curves


def select(plan: Plan, part: Part, curves: dict[float, dict[int, dict[int, dict]]]) -> dict[str, Any] | None:
    """The (lr, step) with the best mean val score over seeds ("average" for multi parts), or None while
    any (lr, step, seed) is missing. Ties: the earlier step, then the smaller lr."""
    key = "perception" if part.kind == "perception" else "average"
    n_ckpt = plan.steps // plan.save_every + (plan.steps % plan.save_every != 0)
    best = None
    for lr in sorted(plan.lrs):
        steps = curves.get(lr, {})
        if len(steps) < n_ckpt or any(len(steps[s]) < len(plan.seeds) for s in steps):
            return None
        for step, seeds in steps.items():
            vals = [seeds[s][key] for s in plan.seeds]
            if any(v is None for v in vals):
                return None
            m = sum(vals) / len(vals)
            if best is None or m > best["val_mean"] or (m == best["val_mean"] and step < best["step"]):
                best = {"lr": lr, "step": step, "val_mean": m, "val_key": key}
    return best


def choose_and_test(plan: Plan, part: Part, arm: str, paths: Paths, abl, *, heldout_data: Path, benchmark: Path,
                    max_new_tokens: int, eval_batch_size: int) -> dict[str, Any] | None:
    """Once the arm's val grid is complete: fix its choice (choice.json) and evaluate it on held-out."""
    from drivekd.errors import ConfigError

    chosen = select(plan, part, val_curves(plan, part, arm, paths))
    if chosen is None:
        return None
    chosen = {**chosen, "seeds": list(plan.seeds)}
    cpath = paths.choice(part.name, arm)
    if cpath.is_file():
        old = json.loads(cpath.read_text(encoding="utf-8"))
        if (old["lr"], old["step"], old["seeds"]) != (chosen["lr"], chosen["step"], chosen["seeds"]):
            raise ConfigError(f"{cpath}: held-out was already evaluated for lr {old['lr']:g} step {old['step']} seeds "
                              f"{old['seeds']}, and val now chooses lr {chosen['lr']:g} step {chosen['step']} (other seeds or "
                              f"lrs?); held-out is looked at once: use another --out, or delete {cpath.parent} knowingly")
    _write_once(cpath, json.dumps(chosen, indent=2) + "\n")
    run = run_name(arm, chosen["lr"])
    for seed in plan.seeds:
        job = next(j for j in abl.run(run).jobs if j.seed == seed)
        ckpt = dict(_checkpoints(abl.run_dir(job), plan.steps))[chosen["step"]]
        _evaluate(ckpt, heldout_data, paths.heldout(part.name, arm, seed), benchmark, max_new_tokens, eval_batch_size,
                  f"{part.name} {arm} seed {seed} (held-out)", job.cfg.image_settings, plan.eval_limit)
    return chosen


# -------------------------------------------------------------------------------------------- report


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean paired difference with a two-sided 95% Student-t interval over seeds (n - 1 df)."""
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T975[min(n - 1, max(T975))] * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "diffs": diffs}


def _heldout_scores(plan: Plan, part: Part, arm: str, paths: Paths) -> dict[int, dict] | None:
    if not paths.choice(part.name, arm).is_file():
        return None
    out = {}
    for seed in plan.seeds:
        rep = paths.heldout(part.name, arm, seed) / "report.json"
        if not rep.is_file():
            return None
        out[seed] = _score(json.loads(rep.read_text(encoding="utf-8")), part.caps)
    return out


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _grad_ratio(run_dir: Path) -> float | None:
    """Mean over logged steps of (sum of teacher terms' gradient norms) / CE's: the teacher terms' scale."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    ratios = []
    for line in path.read_text(encoding="utf-8").splitlines():
        g = json.loads(line).get("grad_norms") or {}
        teacher = sum(v for k, v in g.items() if k != "ce")
        if g.get("ce") and len(g) > 1:
            ratios.append(teacher / g["ce"])
    return sum(ratios) / len(ratios) if ratios else None


def study_report(plan: Plan, paths: Paths, meta: dict[str, Any]) -> dict[str, Any]:
    """OUT/report.md and OUT/study.json from whatever is evaluated so far."""
    from drivekd.ablate.report import mean_std as _mean_std

    def mean_std(values: list) -> dict[str, Any]:  # a capability with no scored question: no number
        return _mean_std(values) if all(v is not None for v in values) else {"mean": None, "std": None, "n": 0}

    results: dict[str, Any] = {}
    md = ["# Validity study v2 (issue 22): CE vs attention KD with the seeing student", "",
          f"Seeds {list(plan.seeds)}; lr grid {[f'{x:g}' for x in plan.lrs]}; {plan.steps} steps x micro-batch "
          f"{plan.micro_batch}, a checkpoint every {plan.save_every} steps. Per arm the (lr, step) with the best mean VAL "
          "accuracy over seeds is chosen (ties: earlier step, smaller lr) once all its jobs are in; only that checkpoint "
          "is evaluated on HELD-OUT. Differences are paired by seed against CE on the same data; the interval is a "
          "two-sided 95% Student-t interval over seeds (n-1 df). Held-out binomial std of one model's perception "
          f"accuracy: {meta.get('heldout_binomial_std', '?')} points.", ""]
    for part in plan.parts.values():
        done = {arm: _heldout_scores(plan, part, arm, paths) for arm in part.arms}
        ce_part = plan.parts[part.ce_part]
        ce_arm = "ce"
        ce = _heldout_scores(plan, ce_part, ce_arm, paths)
        prog = {arm: val_curves(plan, part, arm, paths) for arm in part.arms}
        n_val = sum(len(seeds) for c in prog.values() for lr, steps in c.items() for s, seeds in steps.items()
                    if s == plan.steps)
        if n_val == 0:
            continue
        pr: dict[str, Any] = {"kind": part.kind, "size": part.size, "jobs": plan.jobs(part), "jobs_val_evaluated": n_val,
                              "arms": {}}
        md += [f"## Part {part.name} ({part.kind}, {part.size} training questions): "
               f"{n_val} of {plan.jobs(part)} jobs trained and val-evaluated", ""]
        cols = list(part.caps) + (["average"] if part.kind == "multi" else [])
        md += ["| Arm | lr | stop step | val (chosen) | " + " | ".join(f"held-out {c}" for c in cols)
               + " | " + " | ".join(f"diff to CE, {c} [95% CI]" for c in cols) + " | teacher/CE grad |",
               "|---|---:|---:|---:|" + "---:|" * (2 * len(cols)) + "---:|"]
        for arm in part.arms:
            choice = json.loads(paths.choice(part.name, arm).read_text()) if paths.choice(part.name, arm).is_file() else None
            a: dict[str, Any] = {"choice": choice, "heldout": None, "paired_to_ce": None}
            cells, dcells = ["pending"] * len(cols), ["-"] * len(cols)
            ratio = None
            if done[arm] is not None:
                a["heldout"] = {c: mean_std([done[arm][s][c] for s in plan.seeds]) for c in cols}
                cells = [f"{_fmt(a['heldout'][c]['mean'])} ± {_fmt(a['heldout'][c]['std'])}" for c in cols]
                if ce is not None and not (part.name == ce_part.name and arm == ce_arm):
                    a["paired_to_ce"] = {c: paired([done[arm][s][c] - ce[s][c] for s in plan.seeds])
                                         if all(done[arm][s][c] is not None and ce[s][c] is not None for s in plan.seeds)
                                         else {"n": 0, "mean": None, "sd": None, "ci95": None} for c in cols}
                    dcells = [f"{p['mean']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]" if p["ci95"] else
                              _fmt(p["mean"]) for p in (a["paired_to_ce"][c] for c in cols)]
                run_dir = paths.part(part.name) / "runs" / run_name(arm, choice["lr"])
                rs = [r for r in (_grad_ratio(run_dir / f"seed-{s}") for s in plan.seeds) if r is not None]
                ratio = sum(rs) / len(rs) if rs else None
                a["teacher_to_ce_grad"] = ratio
            md.append(f"| {arm} | {_fmt(choice and choice['lr'], 4) if choice else '-'} | {choice['step'] if choice else '-'} | "
                      f"{_fmt(choice['val_mean']) if choice else '-'} | " + " | ".join(cells) + " | " + " | ".join(dcells)
                      + f" | {_fmt(ratio, 3)} |")
            a["val_curves"] = {f"{lr:g}": {str(st): mean_std([v["perception" if part.kind == "perception" else "average"]
                                                               for v in seeds.values() if v is not None])
                                           for st, seeds in steps.items()} for lr, steps in prog[arm].items()}
            pr["arms"][arm] = a
        md += ["", "Val accuracy by step (mean over the seeds evaluated so far, n in brackets):", "",
               "| Arm | lr | " + " | ".join(f"step {s}" for s in range(plan.save_every, plan.steps + 1, plan.save_every)) + " |",
               "|---|---:|" + "---:|" * len(range(plan.save_every, plan.steps + 1, plan.save_every))]
        for arm in part.arms:
            for lr in plan.lrs:
                curve = pr["arms"][arm]["val_curves"].get(f"{lr:g}", {})
                md.append(f"| {arm} | {lr:g} | " + " | ".join(
                    f"{_fmt(curve[str(s)]['mean'], 1)} ({curve[str(s)]['n']})" if str(s) in curve else "-"
                    for s in range(plan.save_every, plan.steps + 1, plan.save_every)) + " |")
        md.append("")
        results[part.name] = pr
    pending = [p for p in plan.parts.values() if any(_heldout_scores(plan, p, a, paths) is None for a in p.arms)]
    md += ["## Parts not complete yet", ""] + ([f"- `{p.name}` ({plan.jobs(p)} jobs): `{meta['command_stem']} --part {p.name}`"
                                                 for p in pending] or ["(none)"]) + [""]
    study = {**meta, "plan": {"sizes": list(plan.sizes), "multi_samples": plan.multi_samples, "lrs": list(plan.lrs),
                              "seeds": list(plan.seeds), "steps": plan.steps, "save_every": plan.save_every,
                              "micro_batch": plan.micro_batch, "calibrated_arm": plan.calibrated,
                              "parts": {p.name: {"kind": p.kind, "size": p.size, "arms": p.arms, "jobs": plan.jobs(p)}
                                        for p in plan.parts.values()}},
             "results": results, "parts_pending": [p.name for p in pending]}
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "study.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    (paths.out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return study


# ----------------------------------------------------------------------------------------------- entry


def prepare(teacher: Path, student: Path | None, benchmark: Path, out: Path, plan: Plan) -> dict[str, Any]:
    """Check the inputs and write the derived data files once: the training sets, val / held-out files."""
    from drivekd.data.loaders import load_samples
    from drivekd.errors import ConfigError

    benchmark, out = benchmark.resolve(), out.resolve()
    if student is None:  # the tiny demo student config (same family and processor as the demo teacher), fixed seed
        from drivekd.demo.tiny_models import make_internvl

        student = out / "student-init"
        if not (student / "config.json").is_file():
            make_internvl(student, "student", seed=1001)
    for flag, p in (("--teacher", teacher), ("--student", student), ("--benchmark", benchmark)):
        if not Path(p).is_dir():
            raise ConfigError(f"{flag} {p} is not a folder")
    train_path = split_file(benchmark, "train")
    train_all = load_samples(train_path, benchmark, check_images=False)
    records = json.loads(train_path.read_text(encoding="utf-8"))
    evals = {}
    for split in ("val", "heldout"):
        path = split_file(benchmark, split)
        shared = _image_set(train_all) & _image_set(load_samples(path, benchmark, check_images=False))
        if shared:
            raise ConfigError(f"--benchmark {benchmark}: the {split} split shares {len(shared)} image(s) with train "
                              f"(e.g. {sorted(shared)[0]}); the splits must be disjoint by scene")
        evals[split] = path
    perception = [r for r, s in zip(records, train_all) if s.capability == "perception"]
    if max(plan.sizes) > len(perception):
        raise ConfigError(f"--sizes: the train split holds {len(perception)} perception questions, fewer than {max(plan.sizes)}")
    ids = {s.id for s in balanced_subset(train_all, plan.multi_samples)}
    multi = [r for r, s in zip(records, train_all) if s.id in ids]
    data = out / "data"
    _write_once(data / "train-perception.json", json.dumps(perception[: max(plan.sizes)], indent=1) + "\n")
    _write_once(data / "train-multi.json", json.dumps(multi, indent=1) + "\n")
    files = {"student": Path(student).resolve(), "train": {"perception": data / "train-perception.json", "multi": data / "train-multi.json"},
             "val": {"perception": _filter_records(evals["val"], data / "val-perception.json", ("perception",)), "multi": evals["val"]},
             "heldout": {"perception": _filter_records(evals["heldout"], data / "heldout-perception.json", ("perception",)),
                         "multi": evals["heldout"]}}
    bench_info = benchmark / "benchmark.json"
    files["heldout_binomial_std"] = (json.loads(bench_info.read_text())["heldout_binomial_std"]["perception"]
                                     if bench_info.is_file() else None)
    return files


def run_study(teacher: Path, student: Path | None, benchmark: Path, out: Path, plan: Plan, parts: list[str], *,
              max_new_tokens: int = 10, eval_batch_size: int = 32, device: str | None = None, command_stem: str = "",
              log=print) -> dict[str, Any]:
    """Run the named parts (resumable), then rewrite OUT/report.md and OUT/study.json from all that is done."""
    import torch

    from drivekd.errors import ConfigError

    unknown = [p for p in parts if p.split("@")[0] not in plan.parts and p != "report"]
    if unknown:
        raise ConfigError(f"--part {unknown[0]}: no such part (parts: {', '.join(plan.parts)}, report; NAME@LR for one lr)")
    for p in parts:
        if "@" in p and float(p.split("@")[1]) not in plan.lrs:
            raise ConfigError(f"--part {p}: {p.split('@')[1]} is not in --lrs {','.join(f'{x:g}' for x in plan.lrs)}")
    t0 = time.perf_counter()
    files = prepare(Path(teacher), student, Path(benchmark), Path(out), plan)
    paths = Paths(Path(out).resolve())
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ran = []
    for name in parts:
        if name == "report":
            continue
        part = plan.parts[name.split("@")[0]]
        ran.append(run_part(plan, part, paths, benchmark=Path(benchmark).resolve(), teacher=Path(teacher).resolve(),
                            student=files["student"], val_data=files["val"][part.kind], heldout_data=files["heldout"][part.kind],
                            train_data=files["train"][part.kind], cache=paths.out / "stores" / part.kind, device=dev,
                            max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size,
                            lr=float(name.split("@")[1]) if "@" in name else None, log=log))
    meta = {"teacher": str(teacher), "student": str(files["student"]), "benchmark": str(benchmark),
            "heldout_binomial_std": files["heldout_binomial_std"], "command_stem": command_stem,
            "max_new_tokens": max_new_tokens, "this_call": {"parts": parts, "ran": ran,
                                                            "wall_seconds": round(time.perf_counter() - t0, 1)}}
    return study_report(plan, paths, meta)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--teacher", type=click.Path(path_type=Path), required=True, help="Trained teacher checkpoint (all three roles).")
@click.option("--student", type=click.Path(path_type=Path), default=None, help="Student initialisation; every run starts from it "
              "(the study: drivekd/demo/student, the seeing student). Default: a fresh tiny demo student config (OUT/student-init).")
@click.option("--benchmark", type=click.Path(path_type=Path), required=True, help="drivekd.demo.benchmark folder (train / val / heldout).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("validity-study"), show_default=True)
@click.option("--part", "parts", multiple=True, help="Part(s) to run (repeatable; see --list-parts); NAME@LR runs one lr of a "
              "part (the arm is chosen once its whole lr grid is in); 'report' only rewrites the report. Default: every part "
              "(many hours on 2 cores).")
@click.option("--list-parts", is_flag=True, help="Print the parts, their arms and job counts, and exit.")
@click.option("--seeds", type=int, default=None, help="Seeds 1..N (default 5; --quick: 2).")
@click.option("--sizes", default=None, help="Perception training sizes (questions), comma list (default 100,400,1200; --quick: 4).")
@click.option("--multi-samples", type=int, default=None, help="Capability-balanced training subset of the multi parts (default 600; --quick: 6).")
@click.option("--lrs", default=None, help="Learning-rate grid, comma list (default 1e-3,2e-3; --quick: 1e-3).")
@click.option("--steps", type=int, default=None, help="Optimizer steps per run (default 400: at 200 no arm left the prior; "
              "--quick: 2).")
@click.option("--save-every", type=int, default=None, help="Checkpoint (and val evaluation) every N steps (default 100; --quick: 1).")
@click.option("--micro-batch", type=int, default=8, show_default=True, help="Samples per step (grad_accum 1).")
@click.option("--calibrated-arm", default=None, help="SLOT for KD with calibrated MSE: 'KEY=VALUE,...' TrainConfig keys of the "
              "calibration flag; adds arm kd-mse-calibrated to every variants-N part. Default: not run.")
@click.option("--max-new-tokens", type=int, default=10, show_default=True)
@click.option("--eval-batch-size", type=int, default=32, show_default=True)
@click.option("--quick", is_flag=True, help="CI check of the pipeline: tiny sizes, 2 steps, 2 seeds, one lr, 6 records evaluated.")
def main(teacher, student, benchmark, out, parts, list_parts, seeds, sizes, multi_samples, lrs, steps, save_every, micro_batch,
         calibrated_arm, max_new_tokens, eval_batch_size, quick) -> None:
    """Study v2: CE vs attention KD (paper / cosine / lamp layers / multi-teacher), chosen on val, tested on held-out."""
    from drivekd.errors import DriveKDError

    try:
        plan = Plan(sizes=_ints(sizes) if sizes else ((4,) if quick else (100, 400, 1200)),
                    multi_samples=multi_samples or (6 if quick else 600),
                    lrs=_floats(lrs) if lrs else ((1e-3,) if quick else (1e-3, 2e-3)),
                    seeds=tuple(range(1, (seeds or (2 if quick else 5)) + 1)),
                    steps=steps or (2 if quick else 400), save_every=save_every or (1 if quick else 100),
                    micro_batch=micro_batch if not quick else 2, calibrated=parse_keys(calibrated_arm),
                    eval_limit=6 if quick else None)
        if list_parts:
            for p in plan.parts.values():
                click.echo(f"{p.name:16s} {p.kind:10s} n={p.size:<5d} jobs={plan.jobs(p):3d} arms: {', '.join(p.arms)}")
            return
        argv = list(sys.argv) if sys.argv and sys.argv[0].endswith("validity_study.py") else []
        for i in range(len(argv) - 1, 0, -1):  # the command of any part: this one without its --part NAME
            if argv[i] == "--part" and i + 1 < len(argv):
                del argv[i : i + 2]
        stem = "python " + " ".join(argv) if argv else "python tools/validity_study.py ..."
        study = run_study(teacher, student, benchmark, out, plan, list(parts) or list(plan.parts),
                          max_new_tokens=max_new_tokens if not quick else min(max_new_tokens, 8),
                          eval_batch_size=eval_batch_size, command_stem=stem, log=lambda m: click.echo(m, err=True))
    except DriveKDError as e:
        click.echo(f"validity_study: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    click.echo((Path(out) / "report.md").read_text(encoding="utf-8"))
    failed = [f for r in study["this_call"]["ran"] for f in r["failed"]]
    if failed:
        click.echo("failed jobs: " + "; ".join(failed), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
