"""AdamW for bf16 weights that does not lose updates below bf16's resolution.

At lr 5e-5 an Adam step moves a weight by ~lr; bf16 keeps 8 significant bits, so a weight of
magnitude |w| only moves when the step exceeds |w| * 2^-9 (a norm weight of 1.0: 2e-3, forty
times lr). Pure bf16 AdamW (weights and state in bf16, round to nearest) therefore silently drops
most updates. Three fixes, all here, chosen by ``mode`` (tests/test_precision.py and
tools/bench_gram.py --precision measure them against an fp32-master run):

* ``"offload"``: fp32 master weights and fp32 AdamW state on the CPU, bf16 weights and gradients on
  the device. Each step: gradients to the CPU, torch's AdamW on the fp32 masters, masters rounded
  back into the device weights. The optimizer math is exactly fp32 AdamW; device memory 4 bytes/
  parameter (bf16 weights + grads) instead of 16 (+4 grads); host memory 12 bytes/parameter; cost:
  two bf16 copies over PCIe and a CPU AdamW pass per optimizer step (not per micro-step).
* ``"kahan"``: bf16 weights with a bf16 compensation buffer holding what rounding dropped
  (Kahan-summed updates); AdamW moments in bf16 with stochastic rounding. 8 bytes/param on device.
* ``"stochastic"``: bf16 weights and moments, every write stochastically rounded (unbiased: small
  updates survive in expectation). 6 bytes/parameter on device.
* ``"nearest"``: pure bf16 AdamW (the authors' trainer); the baseline that loses updates.

Measured (tests/test_precision.py: tiny Qwen2 LM, 200 steps, lr 5e-5; distance to the fp32-master
run's weights / how far that run moved them; loss gap / its loss drop): offload 0.045 / 8e-5,
kahan 0.045 / 1.5e-5 (both at the floor set by the bf16 forward itself), stochastic 0.17,
nearest 0.76 / 0.51. Choice: "offload" where host memory allows (least device memory, exact
optimizer math), else "kahan".

Use like any optimizer: ``opt = BF16AdamW(model.parameters(), lr=..., mode="offload")``;
``opt.step()``; ``opt.zero_grad()``; ``state_dict``/``load_state_dict`` round-trip (the
compensation, the offloaded masters and their AdamW state, and the stochastic-rounding generator:
a resumed run continues bit-exactly).

The trainer's ``--precision`` (``PRECISIONS``) names these modes: ``fp32`` (fp32 weights and
torch's AdamW, the default), ``bf16-offload``, ``bf16-kahan``, ``bf16-stochastic`` and
``bf16-pure`` (nearest; for comparison only). ``param_dtype`` and ``make_optimizer`` map a
precision to the weights' dtype and the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

__all__ = ["BF16AdamW", "MODES", "PRECISIONS", "make_optimizer", "param_dtype", "stochastic_round_"]

MODES = ("offload", "kahan", "stochastic", "nearest")
# --precision -> BF16AdamW mode (None: fp32 weights and torch's AdamW).
PRECISIONS = {"fp32": None, "bf16-offload": "offload", "bf16-kahan": "kahan", "bf16-stochastic": "stochastic",
              "bf16-pure": "nearest"}
# Elements per chunk of the in-place (kahan / stochastic / nearest) step: its fp32 temporaries
# (moments, update, weight; ~6 x 4 bytes per element) then take <= 400 MB even for a 311M-element
# embedding, instead of 7 GiB at once.
_STEP_CHUNK = 1 << 24


def param_dtype(precision: str) -> torch.dtype:
    """The weights' (and gradients') dtype under ``--precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.float32 if PRECISIONS[precision] is None else torch.bfloat16


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, precision: str = "fp32",
                   seed: int = 0) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8) for ``--precision``: torch's for fp32 weights, else BF16AdamW."""
    param_dtype(precision)  # validates the name
    mode = PRECISIONS[precision]
    if mode is None:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return BF16AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, mode=mode, seed=seed)


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """out (bf16) := x (fp32) rounded to bf16 up or down with probability given by the distance:
    E[out] = x. Adds uniform noise to the 16 low bits of x's fp32 pattern, then truncates them."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    r = (bits + noise) & -65536  # 0xFFFF0000 as int32
    # Inf/NaN (exponent all ones) keep their bits: the noise must not turn inf into nan.
    r = torch.where(torch.isfinite(x), r, bits)
    out.copy_(r.view(torch.float32))  # exact: the low 16 bits are zero
    return out


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) over bf16 parameters; see the module doc.

    Args:
        params: bf16 parameters (all of one device).
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        mode: "offload" | "kahan" | "stochastic" | "nearest".
        seed: the stochastic rounding's generator seed (device generator).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, mode: str = "offload", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.mode = mode
        self.host_context = contextlib.nullcontext
        ps = [p for g in self.param_groups for p in g["params"]]
        bad = sorted({str(p.dtype) for p in ps if p.dtype != torch.bfloat16})
        if bad:
            raise ValueError(f"BF16AdamW needs bf16 parameters, got {bad}: load the model with dtype=torch.bfloat16")
        self._gen = torch.Generator(device=ps[0].device).manual_seed(seed) if ps else None
        if mode == "offload":
            # fp32 masters on the CPU; torch's own AdamW (foreach) updates them, so the math is
            # exactly fp32 AdamW. Pinned memory when a GPU is present: asynchronous copies.
            pin = torch.cuda.is_available()
            self._masters = [[p.detach().to("cpu", torch.float32).clone() for p in g["params"]] for g in self.param_groups]
            self._cpu_grads = [[torch.zeros_like(m, pin_memory=pin) if pin else torch.zeros_like(m) for m in ms]
                               for ms in self._masters]
            for ms, gs in zip(self._masters, self._cpu_grads):
                for m, gr in zip(ms, gs):
                    m.grad = gr
            self._inner = torch.optim.AdamW(
                [dict(params=ms, lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
                 for ms, g in zip(self._masters, self.param_groups)], foreach=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if self.mode == "offload":
            self._step_offload()
            return loss
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    if self.mode == "kahan":
                        st["comp"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                # Flat chunks of the parameter: fp32 temporaries of one chunk at a time.
                flat = [p.view(-1), p.grad.reshape(-1), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)]
                if self.mode == "kahan":
                    flat.append(st["comp"].view(-1))
                for s in range(0, p.numel(), _STEP_CHUNK):
                    self._update([x[s : s + _STEP_CHUNK] for x in flat], g, st["step"])
        return loss

    def _update(self, chunk: list[torch.Tensor], g: dict, t: int) -> None:
        """One AdamW update of a flat chunk: [weight, grad, exp_avg, exp_avg_sq(, comp)] (n,) views."""
        b1, b2 = g["betas"]
        p, grad, exp_avg, exp_avg_sq = chunk[:4]
        grad = grad.float()
        m = exp_avg.float().mul_(b1).add_(grad, alpha=1 - b1)
        v = exp_avg_sq.float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
        del grad
        self._write(exp_avg, m)
        self._write(exp_avg_sq, v)
        upd = v.div_(1 - b2 ** t).sqrt_().add_(g["eps"])  # denominator, in v's storage
        upd = m.div_(1 - b1 ** t).div_(upd).mul_(-g["lr"])  # fp32 update, in m's storage
        del v
        w = p.float()
        if g["weight_decay"]:
            upd.add_(w, alpha=-g["lr"] * g["weight_decay"])
        if self.mode == "kahan":
            # Kahan: add the update plus what earlier roundings dropped; keep the new remainder.
            comp = chunk[4]
            new = w.add_(upd).add_(comp.float())  # fp32: exact enough (|comp| <= ulp(w) / 2)
            p.copy_(new)  # round to nearest
            comp.copy_(new.sub_(p.float()))  # the remainder the rounding dropped
        elif self.mode == "stochastic":
            stochastic_round_(p, w.add_(upd), self._gen)
        else:  # nearest
            p.copy_(w.add_(upd))

    def _write(self, state: torch.Tensor, x: torch.Tensor) -> None:
        if self.mode == "nearest":
            state.copy_(x)
        else:
            stochastic_round_(state, x, self._gen)

    def _step_offload(self) -> None:
        for g, ms, gs in zip(self.param_groups, self._masters, self._cpu_grads):
            for p, m, gr in zip(g["params"], ms, gs):
                if p.grad is None:
                    m.grad = None
                else:
                    gr.copy_(p.grad, non_blocking=True)
                    m.grad = gr
        for ig, g in zip(self._inner.param_groups, self.param_groups):  # follow schedulers on the outer groups
            ig["lr"] = g["lr"]
        if any(p.grad is not None for g in self.param_groups for p in g["params"]):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            with self.host_context():  # the planner counts this step's temporaries as host memory
                self._inner.step()
        for g, ms in zip(self.param_groups, self._masters):
            for p, m in zip(g["params"], ms):
                p.copy_(m, non_blocking=True)

    def host_tensors(self) -> list[torch.Tensor]:
        """What "offload" keeps in host memory: fp32 masters, their gradients, their AdamW state."""
        if self.mode != "offload":
            return []
        inner = [v for st in self._inner.state.values() for v in st.values() if torch.is_tensor(v)]
        return [t for ms in self._masters for t in ms] + [t for gs in self._cpu_grads for t in gs] + inner

    def state_dict(self):
        sd = super().state_dict()
        sd["mode"] = self.mode
        if self._gen is not None:
            sd["generator"] = self._gen.get_state()  # stochastic rounding: a resumed run draws the same noise
        if self.mode == "offload":
            sd["inner"] = self._inner.state_dict()
            sd["masters"] = [[m.clone() for m in ms] for ms in self._masters]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        mode = state_dict.pop("mode", self.mode)
        if mode != self.mode:
            raise ValueError(f"optimizer state is for mode {mode!r}, this run uses {self.mode!r}: resume with the same mode")
        inner, masters = state_dict.pop("inner", None), state_dict.pop("masters", None)
        gen = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if gen is not None and self._gen is not None:
            self._gen.set_state(gen.cpu())
        if self.mode == "offload":
            self._inner.load_state_dict(inner)
            with torch.no_grad():
                for ms, saved in zip(self._masters, masters):
                    for m, s in zip(ms, saved):
                        m.copy_(s)
