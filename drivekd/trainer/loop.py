"""`train(cfg, targets=None)`: the Drive-KD training loop.

Per optimizer step, in the order things happen (the parts live in drivekd/trainer/step.py, which
the planner drivekd/planner runs on fake tensors; see there why one forward serves every loss):

    weights   static, or the online re-weighting's current ones
    for each of grad_accum micro-steps:
        micro_step   forward with capture -> losses -> backward(s) into per-loss rows -> combine
        record       the micro-step's losses and gradient Gram into the step's metrics (host side)
    average -> clip -> optimizer step -> schedule step -> re-weighting update
    log the metrics line (with each row's share of the update)
    --eval-data: validate when due -> its metrics line, best/ (drivekd/trainer/validation.py)
    checkpoint when due

Before step 1, --calibrate-kd sets the teacher terms' static weights from the gradient norms of the
first micro-batches (drivekd/trainer/contribution.py); early on, a teacher term whose share of the
update stays small is named on the console and in run.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from drivekd.distributed import Dist
from drivekd.errors import DriveKDError
from drivekd.families.base import Family, load_model
from drivekd.fileio import append_line, atomic_write_text, write_error
from drivekd.planner import run_peak
from drivekd.store.targets import TargetSource
from drivekd.trainer import checkpoint as ckpt
from drivekd.trainer import schedule as schedules
from drivekd.trainer import trainable
from drivekd.trainer import validation
from drivekd.trainer.contribution import ShareMonitor, calibrated_weights, row_norms
from drivekd.trainer.identity import write_run_json
from drivekd.trainer.plan import RunPlan, describe, validate
from drivekd.trainer.report_to import report_metrics
from drivekd.trainer.settings import TrainConfig
from drivekd.trainer.data import Collate, Failed, StreamSampler, TargetDataset, make_loader
from drivekd.trainer.metrics import StepStats
from drivekd.trainer.step import FlatGrads, TrainStep
from drivekd.trainer.student import autocast_dtype, prepare_student  # noqa: F401 - loop's API too

__all__ = ["Dist", "FlatGrads", "TrainResult", "Trainer", "autocast_dtype", "banner", "prepare_student", "train"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- re-weighting


class Reweighting:
    """Online loss re-weighting (METHOD.md section 7) over the rows with a static weight > 0."""

    def __init__(self, plan: RunPlan):
        from drivekd.optim.reweight import DynamicWeights

        cfg = plan.cfg
        self.names = plan.row_names
        self.static = plan.static_weights
        self.live = [n for n, w in zip(self.names, self.static) if w > 0]
        self.dw = DynamicWeights(self.live, [w for w in self.static if w > 0], alpha=cfg.reweight_alpha, lr=cfg.reweight_lr,
                                 detach_target=False)  # as the reference: sum_j G_j keeps its graph

    def weights(self) -> list[float]:
        cur = self.dw.weight_dict()
        return [cur.get(n, 0.0) for n in self.names]

    def update(self, mean_losses: dict[str, float], mean_norms: dict[str, float]) -> None:
        keep = [n for n in mean_losses if n in self.live]
        self.dw.update({n: mean_losses[n] for n in keep}, {n: mean_norms[n] for n in keep})

    def state_dict(self) -> dict:
        return self.dw.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dw.load_state_dict(state)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    run: Path
    final: Path | None
    steps: int
    losses: list[float]  # weighted total loss per optimizer step run in this call
    metrics: list[dict[str, Any]]
    plan: RunPlan


class Trainer:
    def __init__(self, plan: RunPlan, source: TargetSource, dist: Dist):
        self.plan, self.cfg, self.source, self.dist = plan, plan.cfg, source, dist
        cfg, dev = self.cfg, dist.device
        self.out = Path(cfg.out)
        self.device = dev
        self.validation = validation.prepare(plan, dist)  # --eval-data: read and checked before the student loads
        self.family = Family.from_pretrained(cfg.student, text_tokens=cfg.text_tokens, image_processing=cfg.image_settings)
        # Weights and optimizer state per --precision (fp32 by default); compute under autocast.
        # A LoRA checkpoint holds the adapter only: its base weights are --student's.
        from drivekd.optim.precision import param_dtype

        # --fsdp: loaded on the CPU (sharding moves each unit to the device) from --student; a
        # sharded step checkpoint then overwrites the weights in _restore.
        model = load_model(cfg.student if cfg.fsdp else trainable.weights_dir(cfg, plan.resume_dir), dtype=param_dtype(cfg.precision),
                           device=torch.device("cpu") if cfg.fsdp else dev)
        self.train_step = TrainStep(prepare_student(model, cfg, plan.resume_dir), plan, dist, autocast_dtype(cfg, dev))
        n = trainable.counts(self.train_step.model)
        log.info("student: %d parameters, %d trainable (%.2f%%)", n["params"], n["trainable"], 100 * n["trainable"] / n["params"])
        if self.train_step.per_loss:
            log.info("gradient engine: %s (%s)", self.train_step.engine, self.train_step.engine_reason)
        self.model, self.optimizer = self.train_step.model, self.train_step.optimizer
        self.step = 0
        # --calibrate-kd: before the re-weighting starts from the static weights.
        self.calibration = self._calibration()
        # --skip-nonfinite's budget (--max-skip-share): micro-batches this rank skipped in the whole run
        # (a resume restores the count from its checkpoint: _restore) and trained in this process.
        self._skipped_micro, self._trained_micro, self._skipped_ids = 0, 0, []
        # --projection none without re-weighting keeps no per-loss gradients: measure the shares on
        # some logged steps (step.py, TrainStep._measured_sum; --contribution-every).
        self.measure_fast = cfg.contribution and not self.train_step.per_loss and len(plan.row_names) > 1
        if self.measure_fast:
            every = f", then every {cfg.contribution_every} logged steps" if cfg.contribution_every else ""
            log.info("one backward of the weighted sum (--projection none, no re-weighting): the rows' shares of the update "
                     "are measured on the first %d logged steps%s (a per-loss Gram each)", cfg.contribution_warn_steps, every)
        self.reweighter = Reweighting(plan) if cfg.dynamic_weights and len(plan.row_names) > 1 else None
        # warmup + cosine to the floor; a resume that extends the run re-stretches it (schedule.py)
        self.schedule, self.extension = self._schedule()
        self.scheduler = schedules.scheduler(self.optimizer, self.schedule)
        if plan.resume_dir is not None:
            self._restore(plan.resume_dir)
        self.facts = self._facts(n)
        # the planner's count of this step (a CUDA run; else why not): drivekd/planner/run_peak.py
        self.facts["planned_memory"] = run_peak.planned_memory(plan, self.facts["tokens"], dev, dist.world)

    def _schedule(self) -> tuple[schedules.Schedule, dict[str, Any] | None]:
        """The run's lr schedule, and (when this start extends the run) what the extension changed."""
        cfg, plan = self.cfg, self.plan
        if plan.resume_dir is None:
            return schedules.fresh(cfg.warmup_ratio, plan.total_steps, cfg.min_lr_ratio), None
        meta = ckpt.read_meta(plan.resume_dir)
        old, step = schedules.recorded(meta, cfg), int(meta["step"])
        if plan.total_steps <= old.end:  # the planner refused a smaller total
            return old, None
        new = schedules.extended(old, step, plan.total_steps)
        log.info("extending the run from %d to %d optimizer steps: the cosine re-stretched from step %d (lr %.3g) to step %d",
                 old.end, new.end, new.start, new.start_factor * cfg.lr, new.end)
        return new, {"from_steps": old.end, "to_steps": new.end, "at_step": step,
                     "rule": f"cosine re-stretched from step {new.start} (lr {new.start_factor * cfg.lr:.6g}) to the floor "
                             f"(lr {new.floor * cfg.lr:.6g}) at step {new.end}"}

    def _facts(self, n: dict[str, int]) -> dict[str, Any]:
        """What the run decided, for the banner and run.json's "run": counts, the gradient engine
        actually used and why, precision, token lengths, and each teacher term's layer pairs."""
        cfg, plan, ts = self.cfg, self.plan, self.train_step
        engine, reason = (ts.engine, ts.engine_reason) if ts.per_loss else (
            "sum", "one backward of the weighted sum (one loss row, or --projection none without re-weighting)")
        return {"samples": len(plan.samples), "optimizer_steps": plan.total_steps, "micro_steps": self._total_micro(),
                "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "world": self.dist.world,
                "params": n["params"], "trainable_params": n["trainable"], "grad_engine": engine, "grad_engine_reason": reason,
                "precision": cfg.precision, "autocast": str(ts.autocast_dtype or torch.float32).replace("torch.", ""),
                "tokens": _token_range(plan) if self.dist.main else None, "schedule": self.schedule.to_json(), "resumed_at_step": self.step,
                "terms": [{"role": t.role, "signal": t.signal, "loss": t.kind, "pairs": [[s, list(tl)] for s, tl in t.pairs]}
                          for t in plan.terms]}

    # ----- the step's state, by its old names (tests and tools that drive parts of a step) -----
    params = property(lambda self: self.train_step.params)
    grads = property(lambda self: self.train_step.grads)
    bufs = property(lambda self: self.train_step.bufs)
    per_loss = property(lambda self: self.train_step.per_loss)
    autocast_dtype = property(lambda self: self.train_step.autocast_dtype)

    def _losses(self, batch, maps):
        """(K row losses with graph, (K, B) detached per-sample values, (B, terms) mixing weights)."""
        out = self.train_step.forward(batch, maps)
        return out.rows, out.per_sample, out.mixw

    # ----- state -----
    def _state(self, final: bool = False) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state()}
        if self.train_step.projection is not None and not final:  # --recipe hidden's width maps: resumable, not in final/
            state["projection"] = self.train_step.projection.state_dict()
        if self.reweighter is not None:
            state["reweight"] = self.reweighter.state_dict()
        return state

    def _meta(self, skips: dict[str, list]) -> dict[str, Any]:
        sampler = self._sampler_for(self.step)
        epoch, pos = sampler.position(self.step * self.cfg.grad_accum)
        return {
            "step": self.step,
            "data": {"stream_position": self.step * self.cfg.grad_accum, "epoch": epoch, "micro_batch_in_epoch": pos,
                     "micro_per_epoch": self.plan.micro_per_epoch, "order": "randperm(seed * 1000003 + epoch)"},
            "world": self.dist.world,
            "config": self.cfg.to_json(),
            "identity": self.plan.identity,
            "calibration": self.calibration,
            "schedule": self.schedule.to_json(),
            "validation": self.validation.state() if self.validation is not None else None,
            "skips": skips,
            **plan_json(self.plan),
        }

    def _skips(self) -> dict[str, list]:
        """--skip-nonfinite's count so far, per rank (every rank calls this: one gather): "micro" the
        micro-batches rank r skipped, "ids" what they were. A resume continues each rank's count, so
        --max-skip-share holds for the whole run, not for each start of it."""
        mine = json.dumps({"micro": self._skipped_micro, "ids": list(dict.fromkeys(self._skipped_ids))})
        ranks = [json.loads(r) for r in self.dist.gather_ids([mine])]  # one JSON string per rank, rank order
        return {"micro": [r["micro"] for r in ranks], "ids": [r["ids"] for r in ranks]}

    def _restore(self, d: Path) -> None:
        meta = ckpt.read_meta(d)
        state = ckpt.load_state(d)
        if self.train_step.projection is not None:
            self.train_step.projection.load_state_dict(state["projection"])
        if self.cfg.fsdp:
            ckpt.load_sharded(d, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.reweighter is not None:
            self.reweighter.load_state_dict(state["reweight"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(meta["step"])
        skips = meta.get("skips")
        if skips is None:  # written before the count was kept: the budget counts from this start
            log.info("%s records no --skip-nonfinite count (an older drivekd): --max-skip-share counts skips from this "
                     "start", d)
        else:  # the planner refused a resume on another number of ranks, so rank r's entry is ours
            self._skipped_micro, self._skipped_ids = int(skips["micro"][self.dist.rank]), list(skips["ids"][self.dist.rank])

    def _save(self, name: str) -> None:
        if self.cfg.fsdp:
            return self._save_sharded(name)
        drop_in = name in ckpt.DROP_IN  # final/, best/: the model alone, as from_pretrained loads it
        skips = self._skips()
        if self.dist.main:
            ckpt.save_checkpoint(self.out, name, self.model, self.family.processor, self._state(final=drop_in), self._meta(skips),
                                 write_model=trainable.model_writer(self.model, final=drop_in, keep=name != ckpt.FINAL))
            if not drop_in:
                ckpt.prune(self.out, self.cfg.keep_last)
        self.dist.barrier()

    def _save_sharded(self, name: str) -> None:
        """--fsdp: step checkpoints through torch.distributed.checkpoint (every rank), final/ and best/
        gathered to rank 0 and written in the plain from_pretrained layout (drivekd/trainer/checkpoint.py)."""
        from drivekd.trainer.fsdp import full_weights, full_writer

        skips = self._skips()
        if name not in ckpt.DROP_IN:
            ckpt.save_sharded(self.out, name, self.model, self.optimizer, self._state(), self._meta(skips), self.dist)
            if self.dist.main:
                ckpt.prune(self.out, self.cfg.keep_last)
        else:
            weights = full_weights(self.model)
            if self.dist.main:
                ckpt.save_checkpoint(self.out, name, self.model, self.family.processor, {}, self._meta(skips),
                                     write_model=full_writer(self.model, weights), weights=list(weights.items()))
        self.dist.barrier()

    # ----- --calibrate-kd -----
    def _calibration(self) -> dict[str, Any] | None:
        """The teacher terms' static weights from their gradient norms (None without
        --calibrate-kd): measured once, at step 0; a resume takes them from its checkpoint, so the
        run keeps the weights it started with. Sets plan.static_weights."""
        cfg, plan = self.cfg, self.plan
        if cfg.calibrate_kd is None or len(plan.row_names) < 2:
            return None
        if plan.resume_dir is not None:
            cal = ckpt.read_meta(plan.resume_dir).get("calibration")
            if cal is None:
                raise DriveKDError(f"cannot resume from {plan.resume_dir} with --calibrate-kd: the checkpoint records no "
                                   "calibrated weights (written without it, or by an older drivekd); resume without "
                                   "--calibrate-kd")
        else:
            norms, n = self._measure_norms(min(cfg.calibrate_batches, self._total_micro()))
            weights = calibrated_weights(plan.row_names, plan.static_weights, norms, cfg.calibrate_kd)
            cal = {"fraction": cfg.calibrate_kd, "micro_batches": n, "seed": cfg.seed,
                   "norms": dict(zip(plan.row_names, norms)),  # mean ||grad row|| at unit weight (mixing included)
                   "static_before": dict(zip(plan.row_names, plan.static_weights)),
                   "weights": dict(zip(plan.row_names, weights)),
                   # what the weights give: each term's weighted norm against the target (fraction x CE's);
                   # short of it where the weight hit the re-weighting's clamp (a term with next to no gradient)
                   "target_norm": cfg.calibrate_kd * weights[0] * norms[0],
                   "weighted_norms": {n: (w * v if v is not None else None) for n, w, v in zip(plan.row_names, weights, norms)}}
            for name, w in zip(plan.row_names[1:], weights[1:]):
                log.info("--calibrate-kd %g: %s weight %.4g (its gradient norm %.3g at weight 1, CE's %.3g)", cfg.calibrate_kd,
                         name, w, cal["norms"][name] or 0.0, norms[0])
        plan.static_weights = [float(cal["weights"][n]) for n in plan.row_names]
        return cal

    def _measure_norms(self, n: int) -> tuple[list[float | None], int]:
        """Mean gradient norm of each row at unit weight over the first `n` micro-batches of the
        run's stream, by the Gram engine (no step taken, no .grad touched). Data parallel: of the
        rank-averaged rows, as the projection sees them (so 2 ranks x micro-batch 1 measure what
        1 process x micro-batch 2 does), the same on every rank. Rows never active: None."""
        from drivekd.families.capture import capture_attention
        from drivekd.projection import GramEngine

        ts, plan = self.train_step, self.plan
        K = len(plan.row_names)
        engine = GramEngine(ts.params, reduce=self.dist.mean_ if self.dist.world > 1 else None)
        sums = torch.zeros(2, K, dtype=torch.float64)  # norm sums, active counts
        it = iter(self._loader())
        for j in range(n):
            batch = next(it)
            if isinstance(batch, Failed):
                raise batch.error
            batch = batch.to(self.device)
            active, _ = ts.row_activity([1.0] * K, plan.mix_weights(batch.capabilities))  # on some rank
            with capture_attention(ts.model, plan.student_layers, grad=True,
                                   attention_mask=batch.inputs.tensors["attention_mask"].bool()) as maps:
                losses = ts.forward(batch, maps)
                bad = [sid for sid, ok in zip(batch.sample_ids, ts.checks.finite_samples(losses.per_sample)) if not ok]
                if self.dist.any(bool(bad)):
                    raise DriveKDError(f"non-finite loss during --calibrate-kd (micro-batch {j}, sample(s) "
                                       f"{', '.join(self.dist.gather_ids(bad))}); check those samples, or drop --calibrate-kd")
                G = engine.gram(losses.rows, active)  # (K, K) of the rank-averaged rows at weight 1
            for r, v in enumerate(row_norms(G)):
                if active[r]:
                    sums[0, r] += v
                    sums[1, r] += 1
        return [float(sums[0, r] / sums[1, r]) if sums[1, r] > 0 else None for r in range(K)], n

    # ----- data -----
    def _total_micro(self) -> int:
        cfg, plan = self.cfg, self.plan
        return cfg.max_steps * cfg.grad_accum if cfg.max_steps else cfg.epochs * plan.micro_per_epoch

    def _sampler_for(self, step: int) -> StreamSampler:
        cfg = self.cfg
        return StreamSampler(len(self.plan.samples), cfg.micro_batch, self.dist.world, self.dist.rank, cfg.seed,
                             step * cfg.grad_accum, self._total_micro())

    def _loader(self):
        dataset = TargetDataset(self.plan.samples, self.source, self.plan.terms)
        collate = Collate(self.family, self.plan.terms, self.source)
        return make_loader(dataset, self._sampler_for(self.step), collate, self.cfg.num_workers, self.cfg.seed,
                           pin_memory=self.device.type == "cuda")

    # ----- one optimizer step -----
    def _weights(self) -> list[float]:
        """Row weights of this step (fp32-rounded, as the loss products use them)."""
        w = self.reweighter.weights() if self.reweighter is not None else self.plan.static_weights
        return torch.tensor(w, dtype=torch.float32).tolist()

    def _order(self, stream_index: int) -> list[int]:
        """AGP/G1/G2 permutation: a pure function of (seed, micro-step), same on every rank."""
        K = len(self.plan.row_names)
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + stream_index)
        return (torch.randperm(K - 1, generator=g) + 1).tolist()

    def _micro_steps(self, it, first: int, stop: int, stats: StepStats, weights: list[float], measure: bool = False) -> None:
        """`measure`: fast path, a logged step: the first micro-step measures the per-loss Gram."""
        for j in range(first, stop):
            batch = next(it)
            if isinstance(batch, Failed):
                raise batch.error
            batch = batch.to(self.device)
            micro = self.train_step.micro_step(batch, weights, self._order(j), where=f"step {self.step + 1} (micro-step {j})",
                                               measure=measure and j == first)
            stats.skipped.extend(micro.skipped)
            if micro.skipped:
                self._skipped_micro += 1
                self._skipped_ids.extend(micro.skipped)
            if micro.losses is not None:
                self._trained_micro += 1
                stats.record(micro, weights, len(batch.sample_ids), batch.tokens)

    def _optimizer_step(self, stats: StepStats) -> float:
        """average -> clip -> AdamW (unless skipped) -> schedule; returns the pre-clip norm."""
        ts = self.train_step
        ts.average(stats.micro)
        grad_norm = float(ts.clip())
        if not math.isfinite(grad_norm):
            if not self.cfg.skip_nonfinite:
                raise DriveKDError(f"non-finite gradient norm at step {self.step + 1}; lower --lr or pass --skip-nonfinite")
            stats.skipped.append(f"step {self.step + 1} (all samples)")
            self._skipped_micro += stats.micro
            self._trained_micro -= stats.micro
            self._skipped_ids.append(f"step {self.step + 1} (all samples)")
        elif stats.micro:
            ts.optimizer_step()
        with warnings.catch_warnings():
            # A step whose micro-batches were all skipped steps the schedule without the optimizer
            # (the schedule stays aligned with the step count); torch warns about that order.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
            self.scheduler.step()
        ts.zero_grad()
        return grad_norm

    def _reweight(self, stats: StepStats, raw_losses: list[float]) -> None:
        """raw_losses: CE, then each teacher term's unmixed mean loss."""
        if self.reweighter is None:
            return
        names, means = self.plan.row_names, stats.raw_norm_means()
        live = [r for r in range(len(names)) if stats.active_counts[r] and means[r] is not None]
        # The raw, unmixed L_i and ||grad L_i|| (METHOD.md section 7, the reference trainer).
        self.reweighter.update({names[r]: raw_losses[r] for r in live}, {names[r]: means[r] for r in live})

    def _one_step(self, it, total_micro: int) -> dict[str, Any]:
        """micro-steps -> average -> clip -> step -> re-weight -> metrics line."""
        t0 = time.perf_counter()
        first = self.step * self.cfg.grad_accum
        stats = StepStats(self.plan.row_names, shares=self.cfg.contribution)
        weights = self._weights()
        measure = self.measure_fast and self._measured(self.step + 1)
        self._micro_steps(it, first, min(first + self.cfg.grad_accum, total_micro), stats, weights, measure)
        g = stats.reduce(self.dist)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._optimizer_step(stats)
        self._reweight(stats, [g.loss_rows[0], *g.raw_terms])
        self.step += 1
        self._check_skips(total_micro)
        return stats.line(g, step=self.step, epoch=round(self.step * self.cfg.grad_accum / self.plan.micro_per_epoch, 4),
                          lr=lr, weights=weights, grad_norm=grad_norm, per_loss=self.train_step.per_loss,
                          seconds=time.perf_counter() - t0, device=self.device)

    def _check_skips(self, total_micro: int) -> None:
        """Stop once --skip-nonfinite skipped more than --max-skip-share of the run's micro-batches:
        a run that silently skips most of its data is not the run the user asked for."""
        budget = int(self.cfg.max_skip_share * total_micro)
        if self._skipped_micro > budget:
            ids = list(dict.fromkeys(self._skipped_ids))
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            raise DriveKDError(f"--skip-nonfinite skipped {self._skipped_micro} micro-batch(es) by step {self.step}, more than "
                               f"--max-skip-share {self.cfg.max_skip_share:g} of the run's {total_micro} ({budget} allowed): "
                               f"{shown}; check those samples and their targets (`drivekd-cache verify`), lower --lr, or "
                               "raise --max-skip-share")

    def _measured(self, step: int) -> bool:
        """Fast path: whether step `step` (1-based) measures the shares: a logged step among the
        first --contribution-warn-steps logged ones (the warning needs them), then every
        --contribution-every-th logged step."""
        cfg, total = self.cfg, self.plan.total_steps
        if not _logged(step, total, cfg.log_every):
            return False
        n = step // cfg.log_every + (step == total and step % cfg.log_every != 0)  # its index among the logged steps
        window = cfg.contribution_warn_steps
        return n <= window or (cfg.contribution_every > 0 and (n - window) % cfg.contribution_every == 0)

    # ----- the run -----
    def _share_monitor(self, metrics_path: Path) -> ShareMonitor:
        """The low-share warning's state; a resumed run replays the records it kept, so the warning
        is decided on the run's first logged steps whichever start logged them (and not printed again)."""
        cfg, plan = self.cfg, self.plan
        monitor = ShareMonitor(plan.row_names, cfg.contribution_warn if cfg.contribution else 0.0, cfg.contribution_warn_steps,
                               sum(_logged(s, plan.total_steps, cfg.log_every) for s in range(1, plan.total_steps + 1)), cfg)
        if self.dist.main and self.step > 0 and metrics_path.exists():
            kept = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            _record_warnings(self.out / "run.json", [w for rec in kept for w in monitor.add(rec)], replayed=True)
        return monitor

    def run(self) -> TrainResult:
        from tqdm import tqdm

        cfg, plan = self.cfg, self.plan
        metrics_path = self.out / "metrics.jsonl"
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out)
            _truncate_metrics(metrics_path, self.step)
            write_run_json(self.out / "run.json", {"config": cfg.to_json(), **plan_json(plan), "world": self.dist.world,
                                                   "notes": plan.notes, "identity": plan.identity, "calibration": self.calibration,
                                                   "run": self.facts, "extended": self.extension},
                           plan.resume_dir, self.step)
            click.echo(banner(self.facts, self.extension), err=True)
        self.dist.barrier()
        if self.validation is not None:
            self.validation.start(self)  # a resume's best-so-far against best/ on disk
        losses, records = [], []
        monitor = self._share_monitor(metrics_path)
        total_micro = self._total_micro()
        it = iter(self._loader())
        bar = tqdm(total=plan.total_steps, initial=self.step, desc="drivekd-train", disable=not (cfg.progress and self.dist.main),
                   dynamic_ncols=True)
        while self.step < plan.total_steps:
            rec = self._one_step(it, total_micro)
            losses.append(rec["loss"])
            records.append(rec)
            if self.dist.main and _logged(self.step, plan.total_steps, cfg.log_every):
                append_line(metrics_path, json.dumps(rec, allow_nan=False), "the metrics log",
                            f"Step {self.step} was trained but not logged or saved; free space, then continue with --resume "
                            "(the run restarts from its latest checkpoint and rewrites the log from there)")
                report_metrics(self, rec)  # the same record to TensorBoard / W&B (--report-to)
                if not cfg.progress:  # a log file gets one plain line per logged step instead of the bar
                    click.echo(plain_line(rec, plan.total_steps), err=True)
                warnings = monitor.add(rec)
                for w in warnings:
                    bar.clear()
                    log.warning("drivekd-train: warning: %s", w["message"])
                _record_warnings(self.out / "run.json", warnings)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4g}" if rec["loss"] is not None else "-", lr=f"{rec['lr']:.2e}")
            save_due = bool(cfg.save_every and self.step % cfg.save_every == 0)
            if self.validation is not None:  # validation when due (-> metrics, best/), then the step checkpoint
                self.validation.after_step(self, save_due)
            elif save_due:
                self._save(ckpt.step_name(self.step))
        bar.close()
        if records and self._trained_micro <= 0:
            raise DriveKDError(f"no micro-batch of steps {self.step - len(records) + 1}..{self.step} was trained (every one skipped "
                               "by --skip-nonfinite), so final/ is not written: check the samples and targets named in "
                               "metrics.jsonl's `skipped`")
        self._save("final")
        return TrainResult(self.out, self.out / "final", self.step, losses, records, plan)


def _logged(step: int, total_steps: int, log_every: int) -> bool:
    """Whether optimizer step `step` (1-based) writes a metrics line."""
    return step % log_every == 0 or step == total_steps


def _record_warnings(path: Path, warnings: list[dict[str, Any]], replayed: bool = False) -> None:
    """Add the run's warnings to run.json: its top level and (unless `replayed` from an earlier
    start's records, whose entry has them) the current start's history entry."""
    if not warnings:
        return
    record = json.loads(path.read_text())
    record["warnings"] = record.get("warnings", []) + warnings
    if record.get("history") and not replayed:
        record["history"][-1]["warnings"] = record["history"][-1].get("warnings", []) + warnings
    try:
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise write_error(e, path, "the run record", "Free space, then continue with --resume") from e


def plan_json(plan: RunPlan) -> dict[str, Any]:
    """The resolved run: rows, static weights, each term's signal and layer pairs, the mixing matrix."""
    return {
        "rows": plan.row_names,
        "static_weights": plan.static_weights,
        "terms": [{"role": t.role, "signal": t.signal, "loss": t.kind, "pairs": [[s, list(ts)] for s, ts in t.pairs]} for t in plan.terms],
        "mix": plan.mix.tolist() if plan.multi else None,
        "samples": len(plan.samples),
        "total_steps": plan.total_steps,
    }


def _token_range(plan: RunPlan, limit: int = 256) -> dict[str, Any] | None:
    """Tokens per sample (T) from the store's token ids of the first teacher term, over at most
    `limit` samples (one small array read each); None without a teacher term or stored ids."""
    if not plan.terms or plan.source is None:
        return None
    role, lengths = plan.terms[0].role, []
    for s in plan.samples[:limit]:
        ids = plan.source.read_input_ids(role, s.id)
        if ids is None:
            return None
        lengths.append(int(ids.numel()))
    return {"min": min(lengths), "max": max(lengths), "samples_read": len(lengths), "of": len(plan.samples)}


def banner(facts: dict[str, Any], extension: dict[str, Any] | None = None) -> str:
    """The run's start on the terminal: what `drivekd-train` decided (the same facts as run.json's "run")."""
    f = facts
    pct = 100 * f["trainable_params"] / max(1, f["params"])
    lines = ["***** drivekd-train *****",
             f"  samples: {f['samples']}",
             f"  optimizer steps: {f['optimizer_steps']} (from step {f['resumed_at_step']})" if f["resumed_at_step"]
             else f"  optimizer steps: {f['optimizer_steps']}",
             f"  micro-steps: {f['micro_steps']} (micro-batch {f['micro_batch']} x grad-accum {f['grad_accum']} x {f['world']} process(es))",
             f"  trainable parameters: {f['trainable_params']:,} of {f['params']:,} ({pct:.2f}%)",
             f"  gradient engine: {f['grad_engine']} ({f['grad_engine_reason']})",
             f"  precision: weights {f['precision']}, compute {f['autocast']}",
             f"  planned peak memory: {run_peak.describe(f.get('planned_memory'))}"]
    t = f["tokens"]
    if t is not None:
        some = "" if t["samples_read"] == t["of"] else f", first {t['samples_read']} of {t['of']} samples"
        lines.append(f"  tokens per sample (T): {t['min']}-{t['max']}{some}")
    for term in f["terms"]:
        pairs = ", ".join(f"S{s}<-T{ts}" for s, ts in term["pairs"])
        lines.append(f"  {term['role']}: {term['signal']} {term['loss']}, layers {pairs or '-'}")
    if extension is not None:
        lines.append(f"  extended: {extension['from_steps']} -> {extension['to_steps']} steps, {extension['rule']}")
    return "\n".join(lines)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, keep the metrics of steps <= the checkpoint's step: the file reads as one run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:  # a line cut short when the disk filled or the process was killed mid-write
            continue
        if rec is not None and rec.get("step", 0) <= step:
            keep.append(line)
    try:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    except OSError as e:
        raise write_error(e, path, "the metrics log", "Free space, then run the same command again") from e


def plain_line(rec: dict[str, Any], total_steps: int) -> str:
    """One logged step as a line for --no-progress: step, loss, lr, grad norm, throughput."""
    loss = f"{rec['loss']:.4g}" if rec.get("loss") is not None else "-"
    norm = f"{rec['grad_norm']:.3g}" if rec.get("grad_norm") is not None else "-"
    return (f"drivekd-train: step {rec['step']}/{total_steps} loss {loss} lr {rec['lr']:.2e} grad_norm {norm} "
            f"{rec['samples_per_s']:.1f} samples/s")


def train(cfg: TrainConfig, targets: TargetSource | None = None) -> TrainResult:
    """Validate the whole run, then train. `targets`: a TargetSource to use instead of --cache."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.fsdp:
        from drivekd.trainer.fsdp import check_launch

        check_launch()
    dist = Dist(cfg.device)
    plan = validate(cfg, targets, world=dist.world)
    dist.barrier()  # every rank validated before rank 0 creates the run folder
    for note in plan.notes:
        log.warning(note)
    log.info(describe(plan))
    torch.manual_seed(cfg.seed)
    trainer = Trainer(plan, plan.source, dist)
    return trainer.run()
