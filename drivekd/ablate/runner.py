"""`run_ablation`: train and evaluate every job of an ablation, resumable job by job.

Per job (a run at one seed), in order:

    state/NAME.seed-S.json    settings, status, train_calls, seconds: written before and after each part
    runs/NAME/seed-S/         drivekd-train --out (resumed from its latest checkpoint: --resume)
    eval/NAME/seed-S/         drivekd-eval of its final/, or with [ablation].checkpoint = "best" of its
                              best/ (chosen on the run's validation set); predictions.json resumes too,
                              report.json is the result

A job whose state says "done" and whose eval report exists is skipped; a job whose final/ checkpoint
is complete is not trained again, only evaluated; any other job is trained with --resume, so a
killed ablation restarts where it stopped. A job's settings are recorded in its state: a finished
job whose settings changed in the file is refused (its numbers would not be the file's), naming it.
A drivekd error inside one job (a store without a signal, say) marks that job failed and the
ablation goes on; the report shows the reason.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from drivekd.ablate.config import Ablation, Job
from drivekd.ablate.state import read_state, write_state
from drivekd.errors import ConfigError, DriveKDError
from drivekd.trainer.settings import RESUME_FREE, TrainConfig, recorded_settings

log = logging.getLogger(__name__)


def settings_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that change a run's numbers (as the trainer's resume check compares them), as
    JSON gives them back (tuples as lists), so a recorded state compares equal."""
    return json.loads(json.dumps({k: v for k, v in cfg.to_json().items() if k not in RESUME_FREE}))


@dataclass
class JobOutcome:
    key: str
    status: str  # done | skipped (done before) | failed
    trained: bool = False  # trained (or resumed) in this call
    evaluated: bool = False
    error: str | None = None


@dataclass
class AblationResult:
    outcomes: list[JobOutcome] = field(default_factory=list)
    seconds: float = 0.0
    report: dict[str, Any] | None = None

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _train(cfg: TrainConfig) -> None:
    from drivekd.trainer.loop import train

    train(cfg)


def _evaluate(abl: Ablation, job: Job, model_dir: Path, out_dir: Path, name: str) -> None:
    from drivekd.eval.report import evaluate_model

    evaluate_model(model_dir, abl.eval_data, out_dir, images=abl.eval_images, batch_size=abl.eval_batch_size,
                   max_new_tokens=abl.max_new_tokens, limit=abl.eval_limit, model_name=name,
                   image_settings=job.cfg.image_settings)


def check_finished_settings(abl: Ablation, jobs: Iterable[Job]) -> None:
    """Refuse, before anything trains, a recorded job whose settings differ from the file's now."""
    defaults = settings_identity(TrainConfig())
    for job in jobs:
        state = read_state(abl.state_path(job))
        old, new = state.get("settings"), settings_identity(job.cfg)
        if old is None:
            continue
        old = recorded_settings(old)  # older names and changed defaults, in today's terms
        # A key the state predates (recorded by an older drivekd) had its default then, as the
        # trainer's own resume check assumes.
        diffs = sorted(k for k in new if old.get(k, defaults.get(k)) != new[k])
        if diffs:
            raise ConfigError(
                f"{abl.path}: run {job.run!r}{'' if job.seed is None else f' (seed {job.seed})'} was started with other "
                f"settings ({', '.join(diffs)} changed); give the changed run a new name, or delete "
                f"{abl.run_dir(job)}, {abl.eval_dir(job)} and {abl.state_path(job)} to redo it")


def run_ablation(
    abl: Ablation,
    only: Iterable[str] | None = None,
    evaluate: bool = True,
) -> AblationResult:
    """Train and evaluate the ablation's jobs (all, or the runs named in `only`), then write the
    report of every job evaluated so far (also those of earlier calls)."""
    from drivekd.ablate.report import write_ablation_report

    names = list(only or [])
    for n in names:
        abl.run(n)  # ConfigError naming the unknown run
    runs = [r for r in abl.runs if not names or r.name in names]
    jobs = [j for r in runs for j in r.jobs]
    check_finished_settings(abl, jobs)

    result = AblationResult()
    t0 = time.perf_counter()
    for i, job in enumerate(jobs):
        log.info("ablation job %d/%d: %s", i + 1, len(jobs), job.key)
        result.outcomes.append(_run_job(abl, job, evaluate))
    result.seconds = time.perf_counter() - t0
    result.report = write_ablation_report(abl)
    return result


def _run_job(abl: Ablation, job: Job, evaluate: bool) -> JobOutcome:
    from drivekd.trainer.checkpoint import is_complete

    state_path = abl.state_path(job)
    state = read_state(state_path)
    state.setdefault("train_calls", 0)
    state.setdefault("train_seconds", 0.0)
    state.setdefault("eval_seconds", 0.0)
    if state.get("checkpoint", "final") != abl.checkpoint and abl.eval_dir(job).exists():
        # [ablation].checkpoint changed: the evaluation (predictions included) was of the other checkpoint
        shutil.rmtree(abl.eval_dir(job))
        if state.get("status") == "done":
            state["status"] = "trained"
    state.update(run=job.run, seed=job.seed, settings=settings_identity(job.cfg), checkpoint=abl.checkpoint)
    eval_report = abl.eval_dir(job) / "report.json"
    if state.get("status") == "done" and eval_report.is_file():
        return JobOutcome(job.key, "skipped")

    outcome = JobOutcome(job.key, "done")
    final = abl.run_dir(job) / "final"
    try:
        if not is_complete(final):
            state.update(status="training", train_calls=state["train_calls"] + 1)
            write_state(state_path, state)
            t = time.perf_counter()
            try:
                _train(job.cfg)
            finally:
                state["train_seconds"] += time.perf_counter() - t
            outcome.trained = True
        state.update(status="trained", error=None)
        write_state(state_path, state)
        if evaluate:
            model_dir = abl.run_dir(job) / abl.checkpoint
            if not is_complete(model_dir):
                raise DriveKDError(f"{model_dir}: no complete {abl.checkpoint}/ checkpoint to evaluate ([ablation].checkpoint); "
                                   "a run writes best/ at its first validation whose save_best metric is finite")
            t = time.perf_counter()
            try:
                _evaluate(abl, job, model_dir, abl.eval_dir(job), f"{job.run} seed {job.seed}" if job.seed is not None else job.run)
            finally:
                state["eval_seconds"] += time.perf_counter() - t
            outcome.evaluated = True
            state["status"] = "done"
        write_state(state_path, state)
    except DriveKDError as e:
        message = " ".join(str(e).split())
        state.update(status="failed", error=message)
        write_state(state_path, state)
        log.error("ablation job %s failed: %s", job.key, message)
        return JobOutcome(job.key, "failed", outcome.trained, outcome.evaluated, message)
    return outcome


__all__ = ["AblationResult", "JobOutcome", "check_finished_settings", "read_state", "run_ablation", "settings_identity"]
