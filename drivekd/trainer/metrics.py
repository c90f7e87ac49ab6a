"""What one optimizer step logs: sums over its micro-steps (`StepStats`), reduced across ranks and
turned into one metrics.jsonl line (`StepStats.line`). Host-side only: this is where the step's
tensors are read (`float`, `.cpu()`), after the step code ran."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any

import torch

from drivekd.distributed import Dist
from drivekd.trainer.contribution import update_shares


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


@dataclass
class StepStats:
    """Sums over the micro-steps of one optimizer step (reduced across ranks before logging)."""

    names: list[str]
    shares: bool = True  # --contribution: the rows' shares of the update
    micro: int = 0
    loss_rows: list[float] = field(default_factory=list)  # M-mixed, unweighted row losses
    raw_terms: list[float] = field(default_factory=list)  # unmixed teacher-term losses
    weighted: float = 0.0
    grad_norms: list[float] = field(default_factory=list)  # weighted rows
    raw_norms: list[float] = field(default_factory=list)  # unweighted, unmixed: ||grad L_i||
    active_counts: list[int] = field(default_factory=list)
    cos: dict[str, float] = field(default_factory=dict)
    cos_counts: dict[str, int] = field(default_factory=dict)
    fired: int = 0
    # Each row's share of the applied update (drivekd/trainer/contribution.py), summed over the
    # micro-steps that had a Gram; an inactive row counts 0 there (it added nothing).
    share: list[float] = field(default_factory=list)
    along: list[float] = field(default_factory=list)
    share_micro: int = 0
    along_micro: int = 0
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
        self.share = [0.0] * K
        self.along = [0.0] * K

    def record(self, micro, weights: list[float], samples: int, tokens: int) -> None:
        """Add one micro-step (a step.Micro whose losses are not None)."""
        rows, per_sample, active, info = micro.losses.rows, micro.losses.per_sample, micro.active, micro.info
        mixw = micro.losses.mixw.detach().cpu()  # (B, terms) M[c_b, k]
        K = len(rows)
        self.micro += 1
        self.samples += samples
        self.tokens += tokens
        for r in range(K):
            self.loss_rows[r] += float(rows[r].detach())
            self.weighted += float(weights[r] * rows[r].detach()) if active[r] else 0.0
            if r > 0:
                self.raw_terms[r - 1] += float(per_sample[r].mean())
        if info is None:
            return
        G = info["gram"].cpu()
        norms = G.diagonal().clamp_min(0).sqrt()
        self.fired += int(info["fired"])
        if self.shares:
            share, along = update_shares(G, info["coef"])
            self.share = [a + b for a, b in zip(self.share, share)]
            self.share_micro += 1
            if along is not None:
                self.along = [a + b for a, b in zip(self.along, along)]
                self.along_micro += 1
        for r in range(K):
            if active[r]:
                self.active_counts[r] += 1
                self.grad_norms[r] += float(norms[r])
                # ||grad L_r|| of the raw, unmixed loss (METHOD.md section 7): the row's gradient is
                # w_r * mean_b M[c_b, r] * grad L_r when the micro-batch's samples share a
                # capability (micro-batch 1, the paper's), so divide both factors out.
                scale = weights[r] * (1.0 if r == 0 else float(mixw[:, r - 1].mean()))
                self.raw_norms[r] += float(norms[r] / scale) if scale > 0 else 0.0
        for i in range(K):
            for j in range(i + 1, K):
                if active[i] and active[j] and norms[i] > 0 and norms[j] > 0:
                    key = f"{self.names[i]}|{self.names[j]}"
                    self.cos[key] = self.cos.get(key, 0.0) + float(G[i, j] / (norms[i] * norms[j]))
                    self.cos_counts[key] = self.cos_counts.get(key, 0) + 1

    def reduce(self, dist: Dist) -> "Reduced":
        """Sum what every rank logged (losses are per rank; per-loss rows were already global)."""
        K = len(self.names)
        packet = torch.tensor([self.micro, self.samples, self.tokens, self.weighted, *self.loss_rows, *self.raw_terms],
                              dtype=torch.float64, device=dist.device)
        p = dist.sum_(packet).tolist()
        micro_all = p[0]
        return Reduced(micro_all, p[1], p[2], p[3], [v / max(micro_all, 1) for v in p[4 : 4 + K]],
                       [v / max(micro_all, 1) for v in p[4 + K :]])

    def raw_norm_means(self) -> list[float | None]:
        return [self.raw_norms[r] / c if c else None for r, c in enumerate(self.active_counts)]

    def line(self, g: "Reduced", *, step: int, epoch: float, lr: float, weights: list[float], grad_norm: float,
             per_loss: bool, seconds: float, device: torch.device) -> dict[str, Any]:
        """The metrics.jsonl record of the step."""
        names, n_micro = self.names, max(self.micro, 1)
        mem, mem_kind = peak_memory(device)
        per_row = lambda v: {n: (v[r] / self.active_counts[r] if self.active_counts[r] else None) for r, n in enumerate(names)}  # noqa: E731
        return {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "loss": g.weighted / g.micro if g.micro else None,
            **{f"loss_{n}": g.loss_rows[r] for r, n in enumerate(names)},
            **{f"raw_{n}": g.raw_terms[r - 1] for r, n in enumerate(names) if r > 0},
            "weights": {n: float(weights[r]) for r, n in enumerate(names)},
            "grad_norm": grad_norm,
            "grad_norms": per_row(self.grad_norms) if per_loss else None,
            "grad_cos": {k: v / self.cos_counts[k] for k, v in self.cos.items()} if per_loss else None,
            "active_share": {n: self.active_counts[r] / n_micro for r, n in enumerate(names)} if per_loss else None,
            "projections_fired": self.fired if per_loss else None,
            # Rows' shares of the applied update (per-loss Gram and lambda; rank-consistent: the Gram
            # is of the rank-averaged rows). None where no Gram was measured this step.
            **({f"share_{n}": self.share[r] / self.share_micro if self.share_micro else None for r, n in enumerate(names)}
               if self.shares and len(names) > 1 else {}),
            **({f"along_{n}": self.along[r] / self.along_micro if self.along_micro else None for r, n in enumerate(names)}
               if self.shares and len(names) > 1 else {}),
            "skipped": self.skipped,
            "samples_per_s": g.samples / seconds,
            "tokens_per_s": g.tokens / seconds,
            "step_time_s": seconds,
            "peak_mem_bytes": mem,
            "peak_mem_kind": mem_kind,
        }


@dataclass
class Reduced:
    """Step sums over all ranks: micro-steps, samples, tokens, weighted loss, mean row and term losses."""

    micro: float
    samples: float
    tokens: float
    weighted: float
    loss_rows: list[float]
    raw_terms: list[float]
