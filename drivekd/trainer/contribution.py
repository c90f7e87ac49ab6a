"""How much each loss row moves the student: shares of the applied update, the early warning when a
teacher term barely counts, and the opt-in calibration of the teacher terms' static weights.

Every combine (AGP / G1 / G2 / none) applies u = sum_k lambda_k g_k, a linear combination of the K
weighted per-loss gradient rows g_k (row 0 = CE, then one per teacher term). With the K x K Gram
G = B B^T the step already has, two shares cost O(K^2) and no pass over the N parameters:

    share_k = |lambda_k| ||g_k|| / sum_j |lambda_j| ||g_j||      (||g_k|| = sqrt(G_kk))
    along_k = lambda_k (G lambda)_k / (lambda^T G lambda)         (= <lambda_k g_k, u> / ||u||^2)

`share` says how large each row's term of the update is; `along` how much of the update's length
(squared) lies along it; the along_k sum to 1 and may be negative (a row pulling against the
rest). At the paper's weights with attention MSE the teacher terms' share is 0.1-0.5%
(docs/validity/, issue 22): the warning below names such a term and the knobs that raise it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["ShareMonitor", "calibrated_weights", "row_norms", "update_shares", "weight_flag"]


def update_shares(gram: torch.Tensor, lam: torch.Tensor) -> tuple[list[float], list[float] | None]:
    """(share_k, along_k) per row from the (K, K) Gram of the weighted rows and lambda (K,).

    share: |lambda_k| sqrt(G_kk) over its sum (all zero when every row is zero). along: None when
    the update is numerically zero (lambda^T G lambda below fp rounding of the terms' norms), where
    its direction, and so the split along it, is undefined.
    """
    G = gram.detach().to("cpu", torch.float64)
    lam = lam.detach().to("cpu", torch.float64)
    mag = lam.abs() * G.diagonal().clamp_min(0).sqrt()  # (K,) ||lambda_k g_k||
    total = float(mag.sum())
    share = (mag / total).tolist() if total > 0 else [0.0] * len(mag)
    Gl = G @ lam  # (K,) <g_k, u>
    uu = float(lam @ Gl)  # ||u||^2
    if not uu > 1e-10 * total**2:  # the update cancelled to rounding noise (fp32 Gram: ~1e-7 relative)
        return share, None
    return share, (lam * Gl / uu).tolist()


def weight_flag(term: str) -> str:
    """The flag of a teacher term's static weight (--recipe kl / hidden share --w-kd)."""
    return "--w-kd" if term in ("kl", "hidden") else f"--w-{term}"


@dataclass
class ShareMonitor:
    """Warns once when a teacher term's mean share of the update over the run's first `window`
    logged steps (fewer when the run logs fewer: `logged_steps`) is under `threshold`.

    Fed the metrics records as the loop writes them (`add`); a resumed run replays the records it
    kept (`replay=True`: the decision is made again, so run.json keeps it, but not printed twice).
    """

    rows: list[str]
    threshold: float
    window: int
    logged_steps: int
    cfg: Any = None  # TrainConfig: names the current weight and loss in the message
    seen: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    done: bool = False

    def __post_init__(self):
        self.window = max(1, min(self.window, self.logged_steps))
        self.sums = {r: 0.0 for r in self.rows[1:]}
        if self.threshold <= 0 or len(self.rows) < 2:
            self.done = True  # switched off, or no teacher term (sft)

    def add(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one logged record; returns the warnings decided on it (each once per run)."""
        if self.done:
            return []
        shares = {r: record.get(f"share_{r}") for r in self.sums}
        if any(v is None for v in shares.values()):
            return []  # no shares on this step (a skipped micro-batch, or none measured)
        for r, v in shares.items():
            self.sums[r] += v
        self.seen += 1
        if self.seen < self.window:
            return []
        self.done = True
        return [self._warning(r, s / self.seen, int(record["step"])) for r, s in self.sums.items() if s / self.seen < self.threshold]

    def _warning(self, term: str, mean: float, step: int) -> dict[str, Any]:
        flag = weight_flag(term)
        cfg = self.cfg
        now = f", now {cfg.term_weight(term):g}" if cfg is not None else ""
        knobs = [f"raise its static weight ({flag}{now})"]
        if term not in ("kl", "hidden") and (cfg is None or cfg.loss != "cosine"):
            knobs.append("use --loss cosine (scale-free)")
        knobs.append("or set the teacher weights from their gradients with --calibrate-kd 0.1")
        msg = (f"the {term} teacher term's share of the update averaged {100 * mean:.2g}% over the first {self.seen} "
               f"logged step(s) (under --contribution-warn {100 * self.threshold:g}%): it barely changes the student. "
               f"To make it count: {', '.join(knobs)} (README, 'How much the teacher terms count').")
        return {"kind": "low_share", "term": term, "mean_share": mean, "threshold": self.threshold, "steps": self.seen,
                "at_step": step, "message": msg}


# ----------------------------------------------------------------------------- calibration


def row_norms(gram: torch.Tensor) -> list[float]:
    """||g_k|| of each row from its Gram."""
    return gram.detach().to("cpu", torch.float64).diagonal().clamp_min(0).sqrt().tolist()


def calibrated_weights(names: list[str], static: list[float], norms: list[float | None], fraction: float) -> list[float]:
    """Static weights that make each teacher term's weighted gradient norm `fraction` x CE's.

    `norms[k]`: the mean gradient norm of row k at unit weight (mixing included); CE's weighted
    norm is static[0] * norms[0]. A term switched off (static weight 0) stays off; a term with no
    measured gradient keeps its weight. Weights are clamped to the online re-weighting's range
    (drivekd/optim/reweight.py), which would clamp them anyway: a term that needs more has
    next to no gradient at all.
    """
    import inspect

    from drivekd.errors import ConfigError
    from drivekd.optim.reweight import DynamicWeights

    limits = inspect.signature(DynamicWeights).parameters
    w_min, w_max = limits["w_min"].default, limits["w_max"].default

    if not (norms[0] and norms[0] > 0 and static[0] > 0):
        raise ConfigError("--calibrate-kd sets the teacher weights relative to the CE gradient, which is zero here "
                          "(--w-ce 0, or no answer tokens in the calibration batches); drop --calibrate-kd or set --w-ce > 0")
    target = fraction * static[0] * norms[0]
    out = [static[0]]
    for k in range(1, len(names)):
        n = norms[k]
        out.append(static[k] if static[k] == 0 or not n or n <= 0 else min(max(target / n, w_min), w_max))
    return out
