"""Online loss re-weighting (METHOD.md section 7, the released trainer's semantics).

Each active loss i (CE and each teacher term) has a weight w_i = softplus(a_i) + 1e-8, clamped to
[w_min, w_max] (and w_ce >= ce_floor), initialised to its static weight. Once per optimizer step,
from the step's mean loss L_i and mean raw gradient norm n_i = ||grad L_i|| (unweighted):

    G_i      = w_i * n_i
    p_i      = static_i / sum_j static_j
    r_i      = L_i / L_i(first update)
    target_i = p_i * sum_j G_j * (r_i / mean_j r_j) ** alpha
    a       <- one AdamW step (lr 3e-4, betas 0.9/0.99, no weight decay) on sum_i |G_i - target_i|
    w       <- current weights * (sum static / sum current weights), clamped to [w_min, w_max],
               w_ce floored at ce_floor; written back as a = inverse_softplus(w)

The weights are tiny CPU tensors (fp32, like the reference); losses and norms may be given as
floats or 0-d tensors and are read once in ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DynamicWeights", "inverse_softplus"]

STATE_VERSION = 1


def inverse_softplus(w: torch.Tensor) -> torch.Tensor:
    """a with softplus(a) = w, as the reference writes it: log(expm1(w)) with expm1 clamped at 1e-20;
    above 20, where torch's softplus is the identity, a = w (expm1 overflows fp32 beyond ~88, which
    turned a static weight such as a --calibrate-kd one of 100 into inf, i.e. the 1e6 clamp)."""
    return torch.where(w > 20, w, torch.log(torch.expm1(w).clamp_min(1e-20)))


class DynamicWeights:
    """Online loss weights over named losses (rows of the gradient buffer, CE first).

    Args:
        names: the active losses, e.g. ["ce", "perception", "reasoning", "planning"].
        static_weights: their static weights (same order), each > 0; a zero-weight term is not
            active and must be left out.
        alpha: the loss-ratio exponent (0: target_i = p_i * sum_j G_j).
        lr, betas, weight_decay: the AdamW on the a_i (reference: 3e-4, (0.9, 0.99), 0).
        eps: added to softplus(a).
        w_min, w_max: the clamp of every weight.
        ce_name, ce_floor: the CE weight never goes below ce_floor (a ce_name absent from
            ``names`` disables the floor).
        detach_target: treat target_i as a constant in the objective (GradNorm style). The
            released trainer does NOT detach it (sum_j G_j keeps its graph, so each a_j also gets
            -p_i * sign(G_i - target_i) * dG_j/da_j from every i); pass False to reproduce that.

    Call ``update(mean_losses, mean_norms)`` once per optimizer step with the step's means (the
    loop computes them from the Gram diagonal it already has).
    """

    def __init__(
        self,
        names: Sequence[str],
        static_weights: Sequence[float],
        *,
        alpha: float = 0.0,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        w_min: float = 1e-6,
        w_max: float = 1e6,
        ce_name: str = "ce",
        ce_floor: float = 0.6,
        detach_target: bool = True,
    ):
        names = [str(n) for n in names]
        static = [float(s) for s in static_weights]
        if len(names) != len(static):
            raise ValueError(f"got {len(names)} loss names but {len(static)} static weights")
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"loss names must be non-empty and unique, got {names}")
        for n, s in zip(names, static):
            if not (s > 0 and math.isfinite(s)):
                raise ValueError(
                    f"static weight of {n!r} is {s}: re-weighting needs a finite weight > 0; "
                    "leave a zero-weight term out (it is not active)"
                )
        if not (0 < w_min <= w_max):
            raise ValueError(f"need 0 < w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        self.names = names
        self.static = static
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.ce_name, self.ce_floor = ce_name, float(ce_floor)
        self.detach_target = bool(detach_target)
        self.hparams = {"lr": float(lr), "betas": tuple(float(b) for b in betas), "weight_decay": float(weight_decay)}
        # One scalar parameter per loss (as the reference): AdamW skips the ones without a grad.
        w0 = torch.tensor(static, dtype=torch.float32).clamp(self.w_min, self.w_max)
        self._a = [torch.nn.Parameter(inverse_softplus(w0[i]).clone()) for i in range(len(names))]
        self._opt = torch.optim.AdamW(self._a, lr=lr, betas=betas, weight_decay=weight_decay)
        self.loss_init: dict[str, float] = {}
        self.last_skipped = False

    # ------------------------------------------------------------------ weights

    def _current(self) -> list[torch.Tensor]:
        out = []
        for n, a in zip(self.names, self._a):
            w = (F.softplus(a) + self.eps).clamp(self.w_min, self.w_max)
            if n == self.ce_name:
                w = w.clamp_min(self.ce_floor)
            out.append(w)
        return out

    def weights(self) -> list[float]:
        """Current weights, in ``names`` order (what the losses are multiplied by)."""
        with torch.no_grad():
            return [float(w) for w in self._current()]

    def weight_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights()))

    # ------------------------------------------------------------------ the update

    def update(self, mean_losses: Mapping[str, object], mean_norms: Mapping[str, object]) -> list[float]:
        """One re-weighting update from the step's mean losses and mean raw gradient norms.

        Losses present in both mappings take part; with fewer than two, or when sum_i G_i <= 0,
        nothing changes (``last_skipped`` is set). Returns the weights in ``names`` order.
        """
        self._check_names(mean_losses, mean_norms)
        idx = [i for i, n in enumerate(self.names) if n in mean_losses and n in mean_norms]
        self.last_skipped = True
        if len(idx) < 2:
            return self.weights()
        L = {i: float(mean_losses[self.names[i]]) for i in idx}
        nrm = {i: float(mean_norms[self.names[i]]) for i in idx}
        for i in idx:
            self.loss_init.setdefault(self.names[i], L[i])

        w = self._current()
        G = {i: w[i] * nrm[i] for i in idx}
        G_sum = torch.stack([G[i] for i in idx]).sum()
        if not float(G_sum.detach()) > 0.0:
            return self.weights()
        s_static = sum(self.static[i] for i in idx)
        r = {i: L[i] / max(1e-12, self.loss_init[self.names[i]]) for i in idx}
        r_bar = sum(r.values()) / len(idx)
        total = G_sum.detach() if self.detach_target else G_sum
        obj = torch.zeros(())
        for i in idx:
            target = (self.static[i] / s_static) * total
            if self.alpha != 0.0:
                target = target * (r[i] / r_bar) ** self.alpha
            obj = obj + (G[i] - target).abs()
        self._opt.zero_grad(set_to_none=True)
        obj.backward()
        self._opt.step()

        with torch.no_grad():
            w = self._current()
            scale = s_static / float(torch.stack([w[i] for i in idx]).sum().clamp_min(1e-20))
            for i in idx:
                wi = (w[i] * scale).clamp(self.w_min, self.w_max)
                if self.names[i] == self.ce_name:
                    wi = wi.clamp_min(self.ce_floor)
                self._a[i].copy_(inverse_softplus(wi))
        self.last_skipped = False
        return self.weights()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        """Plain tensors, floats, strings and lists (loads with ``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "static": list(self.static),
            "a": torch.stack([a.detach() for a in self._a]).clone(),
            "loss_init": dict(self.loss_init),
            "optimizer": self._opt.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"re-weighting state has version {state.get('version')!r}, expected {STATE_VERSION}")
        if list(state["names"]) != self.names:
            raise ValueError(
                f"re-weighting state is for losses {list(state['names'])}, this run has {self.names}: "
                "resume with the same teacher terms"
            )
        with torch.no_grad():
            for i, a in enumerate(self._a):
                a.copy_(state["a"][i])
        self._opt.load_state_dict(state["optimizer"])
        self.loss_init = {str(k): float(v) for k, v in state["loss_init"].items()}
        # Checkpoints written before observe()/step() were removed carry an (always empty here) "pending".

    def _check_names(self, *maps: Mapping) -> None:
        for m in maps:
            unknown = set(m) - set(self.names)
            if unknown:
                raise ValueError(f"unknown loss name(s) {sorted(unknown)}; known: {self.names}")
