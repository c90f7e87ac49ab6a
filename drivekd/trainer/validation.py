"""Validation during training: `--eval-data`, `--eval-every`, `--eval-generate`, `--save-best`.

What one validation measures, on the student as it is after optimizer step s:

    eval/ce               mean over the eval samples of each sample's answer-token CE (the training's CE row,
                          by the same forward: drivekd/trainer/step.py)
    eval/loss_<term>      each teacher term's mixed loss, mean_b M[c_b, k] * L_k,b, as train/loss_<term>
    eval/raw_<term>       the same term unmixed, as train/raw_<term>
                          (only when the store holds every term's targets for every eval sample; otherwise
                          the run says so once, at the start, and measures CE alone)
    eval/acc_<capability> --eval-generate: multiple-choice accuracy (%) of greedy answers on a fixed subset
    eval/acc              (the first --eval-max-samples multiple-choice questions by sample id), generated,
                          parsed and scored by drivekd-eval's own code (drivekd/eval/generate.py, parse.py,
                          score.py); eval/acc is the mean over the capabilities the subset has

Every number is a mean over samples, so a data-parallel run (torchrun) splits the eval set over
the ranks (sample i on rank i mod world) and all-reduces sums and counts in float64: the result is
the one process's, up to the order of float additions. Each validation is one line of
metrics.jsonl (`{"step": s, "eval_ce": ..., ...}`; TensorBoard / W&B `eval/...`).

When: after optimizer step s if --eval-every divides s, and after the last step. In that step's
order: the optimizer step -> its metrics line -> validation -> best/ -> the step checkpoint, so a
step checkpoint holds every validation up to its step, and the best-so-far (`"validation"` in
its trainer_state.json).

best/ (--save-best METRIC): the student at the step with the best value so far, written like
final/ (drop-in `from_pretrained` layout, no optimizer state; atomically: drivekd/trainer/checkpoint.py);
its trainer_state.json and run.json's `best` record metric, mode, step and value. A resume takes the
best-so-far from its checkpoint; a best/ on disk that is newer than that checkpoint (written by steps
after it, which the resumed run trains again: exactly, as every resume) and at least as good is kept
as the best so far, so a kill never loses it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drivekd.errors import ConfigError
from drivekd.roles import CAPABILITIES
from drivekd.trainer.checkpoint import BEST
from drivekd.trainer.settings import metric_mode, parse_metric

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- best-so-far


@dataclass
class Best:
    metric: str
    mode: str  # min | max
    step: int
    value: float

    def beaten_by(self, value: float) -> bool:
        """Strictly better: a tie keeps the earlier step."""
        return value < self.value if self.mode == "min" else value > self.value


def read_best(run: Path) -> Best | None:
    """The best/ checkpoint on disk (complete), as recorded in its trainer_state.json."""
    from drivekd.trainer.checkpoint import is_complete, read_meta

    d = Path(run) / BEST
    if not is_complete(d):
        return None
    rec = (read_meta(d).get("validation") or {}).get("best")
    return Best(**rec) if rec else None


# ----------------------------------------------------------------------------- the validator


@dataclass
class Validation:
    """A run's validation: the eval samples, the teacher terms measured on them, the generation subset,
    and the best-so-far. Built by `prepare` (before the student loads); the loop calls `start` once and
    `after_step` after every optimizer step."""

    samples: list  # Sample, in file order
    terms: list  # TermPlan: the run's teacher terms whose targets the store holds for every eval sample
    generate: list  # Sample: the --eval-generate subset
    every: int
    metric: str | None
    mode: str
    best: Best | None = None
    last_step: int = 0  # the last step validated

    # ----- when
    def due(self, step: int, total_steps: int) -> bool:
        return step > self.last_step and ((self.every > 0 and step % self.every == 0) or step == total_steps)

    def facts(self) -> dict[str, Any]:
        """What this run validates on and how (run.json's "validation", a line under the banner)."""
        metrics = ["eval/ce", *(f"eval/{p}_{t.name}" for t in self.terms for p in ("loss", "raw"))]
        if self.generate:
            caps = {s.capability for s in self.generate}
            metrics += [f"eval/acc_{c}" for c in CAPABILITIES if c in caps] + ["eval/acc"]
        return {"samples": len(self.samples), "generated": len(self.generate), "every": self.every, "metrics": metrics,
                "save_best": self.metric, "mode": self.mode if self.metric else None}

    def state(self) -> dict[str, Any]:
        """For the step checkpoints' trainer_state.json (a resume continues from it)."""
        return {"last_step": self.last_step, "best": asdict(self.best) if self.best else None}

    # ----- the loop's calls
    def start(self, trainer) -> None:
        """Every rank, once the run folder exists: reconcile best/ on disk with the resumed state (every
        rank reads it and decides alike; rank 0 then removes a foreign best/ and records the best)."""
        if trainer.dist.main:
            facts = self.facts()
            _record(trainer.out / "run.json", "validation", facts)
            gen = f", {facts['generated']} of them answered by generation" if facts["generated"] else ""
            _echo(f"  validation: {facts['samples']} samples{gen} ({', '.join(facts['metrics'])}), "
                  + (f"every {self.every} steps and " if self.every else "") + "after the last"
                  + (f"; best/ by {self.metric} ({self.mode})" if self.metric else ""))
        if self.metric is None:
            return
        folder = trainer.out / BEST
        disk, present = read_best(trainer.out), folder.exists()
        trainer.dist.barrier()  # every rank has read best/ before rank 0 may remove it
        if present and (disk is None or disk.metric != self.metric or disk.mode != self.mode):
            if trainer.dist.main:
                what = f"{disk.metric} ({disk.mode})" if disk else "an incomplete one"
                log.warning("drivekd-train: %s holds %s, not --save-best %s (%s): removed; this run keeps its own best", folder,
                            what, self.metric, self.mode)
                shutil.rmtree(folder, ignore_errors=True)
            disk = None
        if disk is not None and disk.step > trainer.step and (self.best is None or not disk.beaten_by(self.best.value)):
            # Written after the checkpoint this run resumes from (by steps it trains again): still the best so far.
            log.info("best/ (step %d, %s %.6g) is newer than the checkpoint resumed from (step %d): kept as the best so far",
                     disk.step, disk.metric, disk.value, trainer.step)
            self.best = disk
        if self.best is not None and trainer.dist.main:
            _record(trainer.out / "run.json", "best", asdict(self.best))
        trainer.dist.barrier()

    def after_step(self, trainer, save_due: bool) -> None:
        """Validate when due (-> metrics line, best/), then the step checkpoint when due."""
        from drivekd.trainer.checkpoint import step_name

        if self.due(trainer.step, trainer.plan.total_steps):
            rec = self.evaluate(trainer)
            self._log(trainer, rec)
            self._keep_best(trainer, rec)
        if save_due:
            trainer._save(step_name(trainer.step))

    # ----- one validation
    def evaluate(self, trainer) -> dict[str, Any]:
        """The metrics record of the student as it is now (every rank returns the same)."""
        import torch

        t0 = time.perf_counter()
        model = trainer.model
        was_training = model.training
        model.eval()  # no dropout; the training's RNG is not drawn from
        try:
            with torch.no_grad():
                rec = {"step": trainer.step, **self._losses(trainer)}
                if self.generate:
                    rec.update(self._accuracy(trainer))
        finally:
            model.train(was_training)
        rec["eval_seconds"] = round(time.perf_counter() - t0, 3)
        self.last_step = trainer.step
        return rec

    def _losses(self, trainer) -> dict[str, Any]:
        """eval_ce (and each measured term's eval_loss_ / eval_raw_): sums over this rank's share of the
        samples, all-reduced with the counts."""
        import torch

        from drivekd.trainer.data import Collate, Failed, TargetDataset, make_loader

        dist, ts, cfg = trainer.dist, trainer.train_step, trainer.cfg
        mine = list(range(dist.rank, len(self.samples), dist.world))
        batches = [mine[i:i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        dataset = TargetDataset(self.samples, trainer.source, self.terms)
        loader = make_loader(dataset, batches, Collate(trainer.family, self.terms, trainer.source), cfg.num_workers, cfg.seed)
        names = [t.name for t in self.terms]
        sums = torch.zeros(1 + 2 * len(names) + 1, dtype=torch.float64)  # ce, (mixed, raw) per term, samples
        for batch in loader:
            if isinstance(batch, Failed):
                raise batch.error
            batch = batch.to(trainer.device)
            per, mixw = batch_losses(ts, trainer.plan.student_layers, batch, bool(self.terms))
            per = per.double().cpu()  # (K, B): CE, then each term unmixed (CE alone without terms)
            sums[0] += per[0].sum()
            if mixw is not None:
                mixw = mixw.double().cpu()  # (B, terms)
                for k in range(len(names)):
                    sums[1 + 2 * k] += (mixw[:, k] * per[k + 1]).sum()
                    sums[2 + 2 * k] += per[k + 1].sum()
            sums[-1] += len(batch.sample_ids)
        sums = dist.sum_(sums.to(trainer.device)).cpu()
        n = float(sums[-1])
        rec: dict[str, Any] = {"eval_ce": float(sums[0]) / n}
        for k, name in enumerate(names):
            rec[f"eval_loss_{name}"] = float(sums[1 + 2 * k]) / n
            rec[f"eval_raw_{name}"] = float(sums[2 + 2 * k]) / n
        rec["eval_samples"] = int(n)
        return rec

    def _accuracy(self, trainer) -> dict[str, Any]:
        """eval_acc_<capability> (%) and eval_acc on the generation subset, through drivekd-eval's
        generation, answer parser and scorer; correct / total counts all-reduced over the ranks."""
        import torch

        from drivekd.eval.generate import answer_samples, drivebench_record
        from drivekd.eval.score import score_predictions

        dist, cfg = trainer.dist, trainer.cfg
        mine = self.generate[dist.rank::dist.world]
        counts = torch.zeros(len(CAPABILITIES), 2, dtype=torch.float64)  # (correct, multiple-choice total) per capability
        if mine:
            with trainer.train_step.autocast(cache=True):  # every new token reuses every weight's cast
                answers = answer_samples(trainer.family, trainer.model, mine, max_new_tokens=cfg.eval_max_new_tokens,
                                         batch_size=max(1, cfg.micro_batch), device=trainer.device)
            scored = score_predictions([{**drivebench_record(s), "pred": a} for s, a in zip(mine, answers)])
            for i, cap in enumerate(CAPABILITIES):
                c = scored["capabilities"][cap]
                counts[i, 0], counts[i, 1] = c["mcq_correct"], c["mcq_total"]
        counts = dist.sum_(counts.to(trainer.device)).cpu()
        rec: dict[str, Any] = {}
        accs = []
        for i, cap in enumerate(CAPABILITIES):
            if counts[i, 1] > 0:
                rec[f"eval_acc_{cap}"] = 100.0 * float(counts[i, 0]) / float(counts[i, 1])
                accs.append(rec[f"eval_acc_{cap}"])
        rec["eval_acc"] = sum(accs) / len(accs) if accs else None
        rec["eval_generated"] = int(counts[:, 1].sum())
        return rec

    # ----- output
    def _log(self, trainer, rec: dict[str, Any]) -> None:
        from drivekd.fileio import append_line
        from drivekd.trainer.report_to import report_metrics

        if not trainer.dist.main:
            return
        append_line(trainer.out / "metrics.jsonl", json.dumps(rec, allow_nan=False), "the metrics log",
                    f"Step {trainer.step} was trained and validated but not logged; free space, then continue with --resume")
        report_metrics(trainer, rec)  # TensorBoard / W&B: eval/...
        shown = ", ".join(f"{k[5:]} {v:.4g}" for k, v in rec.items()
                          if k.startswith("eval_") and isinstance(v, float) and k != "eval_seconds")
        _echo(f"drivekd-train: validation at step {rec['step']}: {shown}")

    def _keep_best(self, trainer, rec: dict[str, Any]) -> None:
        if self.metric is None:
            return
        value = rec.get(record_key(self.metric))
        if value is None or not math.isfinite(value):
            return
        if self.best is not None and not self.best.beaten_by(value):
            return
        self.best = Best(self.metric, self.mode, trainer.step, float(value))
        trainer._save(BEST)  # drop-in, atomic; its trainer_state.json carries this state (`state`)
        if trainer.dist.main:
            _record(trainer.out / "run.json", "best", asdict(self.best))


def batch_losses(ts, student_layers, batch, terms: bool):
    """One validation batch's losses (the caller holds torch.no_grad and the model in eval mode; the
    planner counts this same call, drivekd/planner/eval_peak.py): with `terms`, the training's own
    forward with capture -> (per-sample values (K, B): CE, then each term unmixed; mixing weights
    (B, terms)); without, the forward's CE part alone -> ((1, B), None)."""
    from drivekd.families.capture import capture_attention
    from drivekd.losses.attention import answer_positions, token_ce

    if terms:
        with capture_attention(ts.model, student_layers, grad=False,
                               attention_mask=batch.inputs.tensors["attention_mask"].bool()) as maps:
            out = ts.forward(batch, maps)
        return out.per_sample, out.mixw
    labels = batch.inputs.padded("labels").to(ts.device)
    keep, targets = answer_positions(labels)
    with ts.autocast():
        logits = ts.model(**batch.inputs.tensors, logits_to_keep=keep, use_cache=False).logits
    return token_ce(logits, targets)[None], None


def _echo(line: str) -> None:
    """A line on stderr that does not break the training bar."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _record(path: Path, key: str, value: Any) -> None:
    """Set `key` in run.json: its top level and the current start's history entry."""
    from drivekd.fileio import atomic_write_text, write_error

    record = json.loads(path.read_text())
    record[key] = value
    if record.get("history"):
        record["history"][-1][key] = value
    try:
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise write_error(e, path, "the run record", "Free space, then continue with --resume") from e


# ----------------------------------------------------------------------------- preparing (before the student loads)


def prepare(plan, dist) -> Validation | None:
    """The run's validation (None without --eval-data): reads the eval set, decides which teacher terms it
    can measure, picks the generation subset, checks --save-best against all that, and takes the
    best-so-far from the checkpoint a resume continues. Raises ConfigError naming the flag."""
    cfg = plan.cfg
    if cfg.eval_data is None:
        return None
    samples = _load(cfg)
    terms = _measurable_terms(plan, samples)
    generate = _generation_subset(cfg, samples) if cfg.eval_generate else []
    metric = cfg.save_best
    if metric is not None:
        _check_metric(metric, plan, terms, generate)
    v = Validation(samples, terms, generate, cfg.eval_every, metric, metric_mode(metric, cfg.save_best_mode) if metric else "min")
    if plan.resume_dir is not None:
        from drivekd.trainer.checkpoint import read_meta

        state = read_meta(plan.resume_dir).get("validation") or {}
        v.last_step = int(state.get("last_step", 0))
        best = state.get("best")
        if best and metric is not None and best["metric"] == metric and best["mode"] == v.mode:
            v.best = Best(**best)
        elif best:
            note = (f"--save-best is now {metric or 'off'}, the checkpoint tracked {best['metric']} ({best['mode']}): the "
                    "best-so-far starts again")
            log.warning("drivekd-train: %s", note)
            plan.notes.append(note)
    return v


def _load(cfg) -> list:
    from drivekd.data.loaders import load_samples

    if not Path(cfg.eval_data).is_file():
        raise ConfigError(f"--eval-data {cfg.eval_data}: no such file")
    root = cfg.eval_images if cfg.eval_images is not None else cfg.images
    if cfg.eval_images is not None and not Path(cfg.eval_images).is_dir():
        raise ConfigError(f"--eval-images {cfg.eval_images}: no such folder")
    samples = load_samples(cfg.eval_data, root, allow_outside_images=cfg.allow_outside_images)
    if not samples:
        raise ConfigError(f"--eval-data {cfg.eval_data}: no samples")
    return samples


def _measurable_terms(plan, samples: list) -> list:
    """The run's teacher terms, when the store holds every term's targets for every eval sample (then
    the training's own forward measures all rows); else none, and the run says once why (a warning,
    and plan.notes, which run.json keeps)."""
    from drivekd.terms import term_of

    lacking = []
    for t in plan.terms:
        need = term_of(t).store_signal
        missing = [s.id for s in samples
                   if (plan.source.signal_status(t.role, s.id, need) if need else plan.source.sample_status(t.role, s.id)) != "complete"]
        if missing:
            lacking.append(f"{t.name}: {len(missing)} of {len(samples)}, e.g. {missing[0]}")
    if not lacking:
        return list(plan.terms)
    note = (f"--eval-data: the store lacks teacher targets of validation samples ({'; '.join(lacking)}), so validation "
            f"measures eval/ce only (no eval/loss_<term>, eval/raw_<term>); add them with `drivekd-cache build --data "
            f"{plan.cfg.eval_data}`")
    log.warning("drivekd-train: %s", note)
    plan.notes.append(note)
    return []


def _generation_subset(cfg, samples: list) -> list:
    """The first --eval-max-samples multiple-choice questions by sample id (the same every validation)."""
    from drivekd.eval.generate import drivebench_record
    from drivekd.eval.score import is_mcq

    mcq = sorted((s for s in samples if is_mcq(drivebench_record(s))), key=lambda s: s.id)
    if not mcq:
        raise ConfigError(f"--eval-generate: {cfg.eval_data} has no multiple-choice question (DriveBench tag 0, or a "
                          "single-letter answer) to score; drop --eval-generate or give such a file")
    return mcq[: cfg.eval_max_samples]


def _check_metric(metric: str, plan, terms: list, generate: list) -> None:
    m = parse_metric(metric)
    if m["kind"] in ("loss", "raw"):
        row = m["row"]
        if row not in [t.name for t in plan.terms]:
            raise ConfigError(f"--save-best {metric}: this run has no {row} term (its rows: {', '.join(plan.row_names)})")
        if row not in [t.name for t in terms]:
            raise ConfigError(f"--save-best {metric}: the store holds no {row} targets for every --eval-data sample; build "
                              f"them (`drivekd-cache build --data {plan.cfg.eval_data}`) or choose eval/ce")
    if m["kind"] == "acc" and m.get("cap") and not any(s.capability == m["cap"] for s in generate):
        raise ConfigError(f"--save-best {metric}: the --eval-generate subset (--eval-max-samples {plan.cfg.eval_max_samples}) "
                          f"has no {m['cap']} multiple-choice question; raise --eval-max-samples or choose another metric")


def record_key(name: str) -> str:
    """The metrics.jsonl key of a metric name: eval/ce -> eval_ce (report_to maps it back to eval/ce)."""
    return name.replace("/", "_", 1)


__all__ = ["BEST", "Best", "Validation", "batch_losses", "prepare", "read_best", "record_key"]
