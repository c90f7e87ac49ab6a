"""`train(cfg, targets=None)`: the Drive-KD training loop.

Per optimizer step (reads top to bottom in the order things happen):

    for each of grad_accum micro-steps:
        one forward of the student with head-mean attention captured at the loss layers
        losses: CE on the answer span, each teacher term's attention loss per sample
        one backward per active loss into its own gradient row (retain_graph between them)
        [data parallel: all-reduce the K x N rows, so the projection sees global gradients]
        combine the rows (AGP / G1 / G2 / none) and add the result into the parameters' grads
    clip, AdamW step, cosine schedule step, online re-weighting update
    metrics line, checkpoint when due

Why one forward + retain_graph rather than one forward per loss: every loss needs the same forward
(the attention losses read maps of the same pass whose logits give the CE), so recomputing it per
loss would cost K-1 extra forwards for nothing; the retained activations are the ones the first
backward needs anyway, so peak memory is about the same. Attention-loss backwards stop at their
layer (a layer-0 perception loss never reaches the upper decoder or the LM head).

With --projection none and no re-weighting nothing needs per-loss gradients: the loop then runs a
single backward of the weighted sum (the fast path; per-loss gradient norms are not logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drivekd.errors import DriveKDError
from drivekd.families.base import Family, load_model
from drivekd.families.capture import capture_attention
from drivekd.losses.attention import answer_positions, attention_loss, token_ce
from drivekd.projection import GradBuffers, combine
from drivekd.store.targets import TargetSource
from drivekd.trainer import checkpoint as ckpt
from drivekd.trainer.identity import write_run_json
from drivekd.trainer.plan import RunPlan, describe, validate
from drivekd.trainer.report_to import report_metrics
from drivekd.trainer.settings import TrainConfig
from drivekd.trainer.data import Batch, Collate, Failed, StreamSampler, TargetDataset, make_loader

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- processes


class Dist:
    """Rank, world size and device; collective helpers that are no-ops in a single process.

    Under torchrun the model is NOT wrapped in DDP: its automatic gradient sync would average the
    summed gradient, while the projection must see the per-loss rows averaged across ranks.
    """

    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_flag == "auto":
            device_flag = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        elif device_flag == "cuda" and self.world > 1:
            device_flag = f"cuda:{local}"
        self.device = torch.device(device_flag)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.sum_(t).div_(self.world)
        return t

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.sum_(t).item() > 0)

    def gather_ids(self, ids: list[str]) -> list[str]:
        if self.world == 1:
            return ids
        import torch.distributed as dist

        out: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(out, ids)
        return [i for part in out for i in part]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ----------------------------------------------------------------------------- gradients


class FlatGrads:
    """The parameters' accumulated gradient as one flat fp32 (N,) buffer; each `.grad` is a view.

    `combine(..., accumulate_into=flat)` then adds the combined gradient with no extra N-vector,
    the data-parallel fast path reduces one tensor, and `GradBuffers.backward` (which points the
    `.grad`s at its rows during a per-loss backward) restores these views afterwards.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
        self.views, o = [], 0
        for p in params:
            self.views.append(self.flat[o : o + p.numel()].view_as(p))
            o += p.numel()
        for p, v in zip(params, self.views):
            p.grad = v

    def check(self) -> None:
        """Autograd accumulates in place into existing grads; make sure it did (not replaced them)."""
        if any(p.grad is None or p.grad.data_ptr() != v.data_ptr() for p, v in zip(self.params, self.views)):
            raise RuntimeError("a parameter's .grad is no longer a view of the flat gradient buffer")


# ----------------------------------------------------------------------------- re-weighting


class Reweighting:
    """Online loss re-weighting (METHOD.md section 7) over the rows with a static weight > 0."""

    def __init__(self, plan: RunPlan):
        from drivekd.projection.reweight import DynamicWeights

        cfg = plan.cfg
        self.names = plan.row_names
        self.static = plan.static_weights
        self.live = [n for n, w in zip(self.names, self.static) if w > 0]
        self.dw = DynamicWeights(self.live, [w for w in self.static if w > 0], alpha=cfg.reweight_alpha, lr=cfg.reweight_lr)

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


# ----------------------------------------------------------------------------- metrics


@dataclass
class StepStats:
    """Sums over the micro-steps of one optimizer step (reduced across ranks before logging)."""

    names: list[str]
    micro: int = 0
    loss_rows: list[float] = field(default_factory=list)  # M-mixed, unweighted row losses
    raw_terms: list[float] = field(default_factory=list)  # unmixed teacher-term losses
    weighted: float = 0.0
    grad_norms: list[float] = field(default_factory=list)  # weighted rows
    raw_norms: list[float] = field(default_factory=list)  # unweighted: ||grad L_i||
    active_counts: list[int] = field(default_factory=list)
    cos: dict[str, float] = field(default_factory=dict)
    cos_counts: dict[str, int] = field(default_factory=dict)
    fired: int = 0
    samples: int = 0
    tokens: int = 0
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        K = len(self.names)
        self.loss_rows = [0.0] * K
        self.raw_terms = [0.0] * (K - 1)
        self.grad_norms = [0.0] * K
        self.raw_norms = [0.0] * K
        self.active_counts = [0] * K


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


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
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)

        self.family = Family.from_pretrained(cfg.student, text_tokens=cfg.text_tokens, image_processing=cfg.image_settings)
        # Weights and optimizer state in fp32; compute under autocast (mixed precision).
        model_dir = plan.resume_dir or cfg.student
        self.model = load_model(model_dir, dtype=torch.float32, device=dev)
        self.model.train()
        self.model.config.use_cache = False
        if cfg.gradient_checkpointing:
            # Non-reentrant: the capture records maps during the recomputation too, inside the block.
            kw = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        K = len(plan.row_names)
        # Per-loss rows are needed for a projection, for re-weighting (per-loss gradient norms),
        # or not at all (fast path: one backward of the weighted sum).
        self.per_loss = K > 1 and (cfg.projection != "none" or cfg.dynamic_weights)
        self.grads = FlatGrads(self.params)
        self.bufs = GradBuffers(self.params, K, dtype=getattr(torch, cfg.grad_buffer_dtype)) if self.per_loss else None
        self.reweighter = Reweighting(plan) if cfg.dynamic_weights and K > 1 else None

        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=warmup, num_training_steps=plan.total_steps, min_lr_rate=cfg.min_lr_ratio
        )
        self.step = 0
        if plan.resume_dir is not None:
            self._restore(plan.resume_dir)

    # ----- state -----
    def _state(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state()}
        if self.reweighter is not None:
            state["reweight"] = self.reweighter.state_dict()
        return state

    def _meta(self) -> dict[str, Any]:
        sampler = self._sampler_for(self.step)
        epoch, pos = sampler.position(self.step * self.cfg.grad_accum)
        return {
            "step": self.step,
            "data": {"stream_position": self.step * self.cfg.grad_accum, "epoch": epoch, "micro_batch_in_epoch": pos,
                     "micro_per_epoch": self.plan.micro_per_epoch, "order": "randperm(seed * 1000003 + epoch)"},
            "world": self.dist.world,
            "config": self.cfg.to_json(),
            "identity": self.plan.identity,
            **plan_json(self.plan),
        }

    def _restore(self, d: Path) -> None:
        meta = ckpt.read_meta(d)
        state = ckpt.load_state(d)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.reweighter is not None:
            self.reweighter.load_state_dict(state["reweight"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(meta["step"])

    def _save(self, name: str) -> None:
        if self.dist.main:
            ckpt.save_checkpoint(self.out, name, self.model, self.family.processor, self._state(), self._meta())
            if name != "final":
                ckpt.prune(self.out, self.cfg.keep_last)
        self.dist.barrier()

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

    # ----- one micro-step -----
    def _weights(self) -> torch.Tensor:
        if self.reweighter is not None:
            return torch.tensor(self.reweighter.weights(), dtype=torch.float32)
        return torch.tensor(self.plan.static_weights, dtype=torch.float32)

    def _order(self, stream_index: int) -> list[int]:
        """AGP/G1/G2 permutation: a pure function of (seed, micro-step), same on every rank."""
        K = len(self.plan.row_names)
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + stream_index)
        return (torch.randperm(K - 1, generator=g) + 1).tolist()

    def _losses(self, batch: Batch, maps: dict[int, torch.Tensor]):
        """Forward + losses, inside a `capture_attention` block whose dict is `maps`.

        Returns (row losses: K scalars, CE then each term's mean_b M[c_b, k] * L_k,b, unweighted;
        per-sample values (K, B) detached, unmixed; the (B, terms) mixing weights).
        """
        inputs = batch.inputs
        am = inputs.tensors["attention_mask"].bool()
        labels = inputs.padded("labels").to(self.device)
        keep, ce_targets = answer_positions(labels)
        text = inputs.padded("text").to(self.device)
        vision = inputs.padded("vision").to(self.device)
        mixw = self.plan.mix_weights(batch.capabilities).to(self.device)  # (B, terms)
        ac = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ac:
            out = self.model(**inputs.tensors, logits_to_keep=keep, use_cache=False)
        ce = token_ce(out.logits, ce_targets)  # (B,)
        per_sample = [ce]
        rows = [ce.mean()]
        for k, term in enumerate(self.plan.terms):
            per_layer = [
                attention_loss(term.signal, term.kind, maps[s], batch.targets[term.role][s], text=text, vision=vision,
                               valid=am, reduction=self.cfg.full_reduction)
                for s, _ in term.pairs
            ]
            lk = torch.stack(per_layer).mean(0)  # (B,)
            per_sample.append(lk)
            rows.append((mixw[:, k] * lk).mean())
        return rows, torch.stack([v.detach() for v in per_sample]), mixw

    def _micro_step(self, batch: Batch, stream_index: int, stats: StepStats, weights: torch.Tensor) -> None:
        cfg, K = self.cfg, len(self.plan.row_names)
        with capture_attention(self.model, self.plan.student_layers, grad=True,
                               attention_mask=batch.inputs.tensors["attention_mask"].bool()) as maps:
            losses, per_sample, mixw = self._losses(batch, maps)
            finite = torch.isfinite(per_sample).all(0)  # (B,)
            bad_local = [sid for sid, ok in zip(batch.sample_ids, finite.tolist()) if not ok]
            if self.dist.any(bool(bad_local)):
                bad = self.dist.gather_ids(bad_local)
                if not cfg.skip_nonfinite:
                    raise DriveKDError(
                        f"non-finite loss at step {self.step + 1} (micro-step {stream_index}) on sample(s) {', '.join(bad)}; "
                        "check those samples and their targets, lower --lr, or pass --skip-nonfinite to skip such samples"
                    )
                stats.skipped.extend(bad)
                return
            w = weights.to(self.device)
            # A row is active when its weight and (for a teacher term) some sample's mixing weight is > 0.
            active = [float(weights[0]) > 0] + [float(weights[k + 1]) > 0 and bool((mixw[:, k] > 0).any()) for k in range(K - 1)]
            if self.dist.world > 1:
                active = (self.dist.sum_(torch.tensor(active, dtype=torch.float32, device=self.device)) > 0).tolist()
            weighted = [w[r] * losses[r] for r in range(K)]
            if not self.per_loss:
                total = sum(weighted[r] for r in range(K) if active[r])
                total.backward()
                self.grads.check()
                info = None
            else:
                # Backward only where this rank's samples give the row a non-zero weight; the other
                # rows stay zero (and, if no rank fills them, inactive).
                local = [r for r in range(K) if active[r] and (r == 0 or bool((mixw[:, r - 1] > 0).any()))]
                self.bufs.zero_()
                for i, r in enumerate(local):
                    self.bufs.backward(r, weighted[r], retain_graph=i < len(local) - 1)
        if self.per_loss:
            rows = self.bufs.buffer
            self.dist.mean_(rows)  # global per-loss gradients before the (non-linear) combine
            perm = self._order(stream_index)
            if cfg.skip_nonfinite:
                vec, info = combine(rows, cfg.projection, perm, active=active, return_info=True)
                if not torch.isfinite(info["gram"]).all():
                    stats.skipped.extend(self.dist.gather_ids(batch.sample_ids) if self.dist.world > 1 else batch.sample_ids)
                    return
                self.grads.flat.add_(vec)
            else:
                _, info = combine(rows, cfg.projection, perm, active=active, return_info=True, accumulate_into=self.grads.flat)
                if not torch.isfinite(info["gram"]).all():
                    ids = self.dist.gather_ids(batch.sample_ids)
                    raise DriveKDError(f"non-finite gradient at step {self.step + 1} (micro-step {stream_index}) on sample(s) "
                                       f"{', '.join(ids)}; lower --lr or pass --skip-nonfinite")
        self._record(stats, losses, per_sample, weights, active, info, batch)

    def _record(self, stats, rows, per_sample, weights, active, info, batch) -> None:
        K = len(rows)
        stats.micro += 1
        stats.samples += len(batch.sample_ids)
        stats.tokens += batch.tokens
        for r in range(K):
            stats.loss_rows[r] += float(rows[r].detach())
            stats.weighted += float(weights[r] * rows[r].detach()) if active[r] else 0.0
            if r > 0:
                stats.raw_terms[r - 1] += float(per_sample[r].mean())
        if info is None:
            return
        G = info["gram"].cpu()
        norms = G.diagonal().clamp_min(0).sqrt()
        stats.fired += int(info["fired"])
        for r in range(K):
            if active[r]:
                stats.active_counts[r] += 1
                stats.grad_norms[r] += float(norms[r])
                stats.raw_norms[r] += float(norms[r] / weights[r]) if weights[r] > 0 else 0.0
        for i in range(K):
            for j in range(i + 1, K):
                if active[i] and active[j] and norms[i] > 0 and norms[j] > 0:
                    key = f"{stats.names[i]}|{stats.names[j]}"
                    stats.cos[key] = stats.cos.get(key, 0.0) + float(G[i, j] / (norms[i] * norms[j]))
                    stats.cos_counts[key] = stats.cos_counts.get(key, 0) + 1

    # ----- one optimizer step -----
    def _finish_step(self, stats: StepStats, weights: torch.Tensor, seconds: float) -> dict[str, Any]:
        cfg, names, K = self.cfg, self.plan.row_names, len(self.plan.row_names)
        # Reduce what every rank logged (losses are per rank; per-loss rows were already global).
        packet = torch.tensor([stats.micro, stats.samples, stats.tokens, stats.weighted, *stats.loss_rows, *stats.raw_terms],
                              dtype=torch.float64, device=self.device)
        self.dist.sum_(packet)
        p = packet.tolist()
        micro_all, samples, tokens, weighted = p[0], p[1], p[2], p[3]
        loss_rows = [v / max(micro_all, 1) for v in p[4 : 4 + K]]
        raw_terms = [v / max(micro_all, 1) for v in p[4 + K :]]
        n_micro = max(stats.micro, 1)
        if stats.micro:
            self.grads.flat.div_(n_micro)  # mean over micro-steps
            if not self.per_loss:
                self.dist.mean_(self.grads.flat)  # fast path: the plain sum is linear, reduce once per step
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(grad_norm):
            if not cfg.skip_nonfinite:
                raise DriveKDError(f"non-finite gradient norm at step {self.step + 1}; lower --lr or pass --skip-nonfinite")
            self.grads.flat.zero_()
            stats.skipped.append(f"step {self.step + 1} (all samples)")
        elif stats.micro:
            self.optimizer.step()
        self.scheduler.step()
        self.grads.flat.zero_()
        act = [c / n_micro for c in stats.active_counts]
        raw_norm_means = [stats.raw_norms[r] / stats.active_counts[r] if stats.active_counts[r] else None for r in range(K)]
        if self.reweighter is not None:
            live = [r for r in range(K) if stats.active_counts[r] and raw_norm_means[r] is not None]
            self.reweighter.update({names[r]: loss_rows[r] for r in live}, {names[r]: raw_norm_means[r] for r in live})
        self.step += 1
        mem, mem_kind = peak_memory(self.device)
        rec: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.step * cfg.grad_accum / self.plan.micro_per_epoch, 4),
            "lr": lr,
            "loss": weighted / micro_all if micro_all else None,
            **{f"loss_{n}": loss_rows[r] for r, n in enumerate(names)},
            **{f"raw_{n}": raw_terms[r - 1] for r, n in enumerate(names) if r > 0},
            "weights": {n: float(weights[r]) for r, n in enumerate(names)},
            "grad_norm": grad_norm,
            "grad_norms": {n: (stats.grad_norms[r] / stats.active_counts[r] if stats.active_counts[r] else None) for r, n in enumerate(names)} if self.per_loss else None,
            "grad_cos": {k: v / stats.cos_counts[k] for k, v in stats.cos.items()} if self.per_loss else None,
            "active_share": {n: act[r] for r, n in enumerate(names)} if self.per_loss else None,
            "projections_fired": stats.fired if self.per_loss else None,
            "skipped": stats.skipped,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "step_time_s": seconds,
            "peak_mem_bytes": mem,
            "peak_mem_kind": mem_kind,
        }
        return rec

    # ----- the run -----
    def run(self) -> TrainResult:
        from tqdm import tqdm

        cfg, plan = self.cfg, self.plan
        metrics_path = self.out / "metrics.jsonl"
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out)
            _truncate_metrics(metrics_path, self.step)
            write_run_json(self.out / "run.json", {"config": cfg.to_json(), **plan_json(plan), "world": self.dist.world,
                                                   "notes": plan.notes, "identity": plan.identity}, plan.resume_dir, self.step)
        self.dist.barrier()
        losses, records = [], []
        total_micro = self._total_micro()
        it = iter(self._loader())
        bar = tqdm(total=plan.total_steps, initial=self.step, desc="drivekd-train", disable=not (cfg.progress and self.dist.main),
                   dynamic_ncols=True)
        while self.step < plan.total_steps:
            t0 = time.perf_counter()
            first = self.step * cfg.grad_accum
            stats = StepStats(plan.row_names)
            weights = self._weights()
            for j in range(first, min(first + cfg.grad_accum, total_micro)):
                batch = next(it)
                if isinstance(batch, Failed):
                    raise batch.error
                self._micro_step(batch.to(self.device), j, stats, weights)
            rec = self._finish_step(stats, weights, time.perf_counter() - t0)
            losses.append(rec["loss"])
            records.append(rec)
            if self.dist.main and (self.step % cfg.log_every == 0 or self.step == plan.total_steps):
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(rec, allow_nan=False) + "\n")
                report_metrics(self, rec)  # the same record to TensorBoard / W&B (--report-to)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4g}" if rec["loss"] is not None else "-", lr=f"{rec['lr']:.2e}")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self._save(ckpt.step_name(self.step))
        bar.close()
        self._save("final")
        return TrainResult(self.out, self.out / "final", self.step, losses, records, plan)


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


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, keep the metrics of steps <= the checkpoint's step: the file reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, targets: TargetSource | None = None) -> TrainResult:
    """Validate the whole run, then train. `targets`: a TargetSource to use instead of --cache."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist = Dist(cfg.device)
    plan = validate(cfg, targets, world=dist.world)
    dist.barrier()  # every rank validated before rank 0 creates the run folder
    for note in plan.notes:
        log.warning(note)
    log.info(describe(plan))
    torch.manual_seed(cfg.seed)
    trainer = Trainer(plan, plan.source, dist)
    return trainer.run()
