"""The learning-rate schedule, and what it becomes when `--resume` extends a run.

A run's schedule: linear warmup over `warmup` steps (ceil(--warmup-ratio x total steps)), then a
half cosine from --lr down to the floor (--min-lr-ratio x --lr) at `end`, the run's last step;
this is transformers' cosine-with-min-lr schedule, to the bit.

Extending (`--resume` with a larger --max-steps / --epochs): the steps already trained keep the lr
they had; from the step the run resumes at (`start`, or the end of warmup when it resumes inside
it) the cosine is re-stretched: a half cosine from the lr the old schedule gives at `start` down to
the same floor at the new end. A run resumed from its last step, whose lr already sits at the
floor, so continues at the floor (a constant tail); one resumed mid-run decays more slowly to the
new end. Resumed inside warmup, the run is the uninterrupted run of the new length (with the
warmup of the old one). The schedule is recorded in every checkpoint (`trainer_state.json`,
"schedule") and each start's entry of run.json's history, so a second extension stretches the
current one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Schedule:
    """lr factor (x --lr) of the step that follows `step` optimizer steps (0-based, as LambdaLR counts)."""

    warmup: int  # steps of linear warmup
    end: int  # the run's last step: the factor reaches `floor` there
    floor: float  # --min-lr-ratio
    start: int  # where the cosine begins: `warmup` for a fresh run, the resume step of an extension
    start_factor: float = 1.0  # the factor at `start`

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        progress = float(step - self.start) / float(max(1, self.end - self.start))
        cos = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        # (start_factor - floor) is (1 - floor) in a fresh run: the same float operations as transformers'
        return max(0, cos * (self.start_factor - self.floor) + self.floor)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Schedule":
        return cls(int(d["warmup"]), int(d["end"]), float(d["floor"]), int(d["start"]), float(d["start_factor"]))


def fresh(warmup_ratio: float, total_steps: int, min_lr_ratio: float) -> Schedule:
    warmup = math.ceil(warmup_ratio * total_steps)
    return Schedule(warmup, total_steps, min_lr_ratio, warmup, 1.0)


def extended(old: Schedule, step: int, new_end: int) -> Schedule:
    """`old` re-stretched from `step` (the resume step) to `new_end` > old.end (see the module doc)."""
    start = max(step, old.warmup)
    return Schedule(old.warmup, new_end, old.floor, start, old.factor(start))


def recorded(meta: dict[str, Any], cfg) -> Schedule:
    """The schedule a checkpoint ran under: recorded, or (written before schedules were recorded)
    the fresh one of its settings and step count."""
    if meta.get("schedule"):
        return Schedule.from_json(meta["schedule"])
    c = meta.get("config", {})
    return fresh(c.get("warmup_ratio", cfg.warmup_ratio), int(meta["total_steps"]), c.get("min_lr_ratio", cfg.min_lr_ratio))


def scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    # A bound method, not the Schedule itself: LambdaLR saves a callable object's __dict__ and
    # restores it on load, which would put back the checkpoint's schedule over an extended one.
    # (The step count and base lrs still come from the checkpoint's scheduler state.)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)


__all__ = ["Schedule", "extended", "fresh", "recorded", "scheduler"]
