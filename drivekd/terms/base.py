"""The teacher-term interface (`Term`), what a term's loss reads from the forward (`TermForward`),
and the `Recipe`: which terms a run trains, on which roles and which samples.

A term kind is one module of this package (attention.py, logits.py, hidden.py) holding one `Term`
subclass; the registry (`drivekd.terms`) lists them. Everything the trainer does differently per
kind of teacher signal is a method here, so the trainer never asks which kind a term is:

    plan (drivekd.trainer.plan)   on(), roles(), check_student(), resolve()  -> TermPlans
    read (drivekd.trainer.data)   reads()      what to ask the TargetSource for, per sample
                                  collate()    the batch's padded targets of one term
    step (drivekd.trainer.step)   capture_layers(), hidden_layers()  what the forward must record
                                  make_state() extra trainable parameters (the hidden projection)
                                  loss()       the per-sample loss (B,) from the forward's output

The loss math itself lives in drivekd.losses; a term only wires its targets to it.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from drivekd.errors import ConfigError
from drivekd.losses.recipes import TermPlan
from drivekd.store.targets import RoleInfo, SampleTargets, TargetSource


@dataclass(frozen=True)
class Recipe:
    """A --recipe: the term kinds it trains besides CE, their roles, and the samples it trains on."""

    name: str
    terms: tuple[str, ...]  # registered term kinds (drivekd.terms.TERMS names); () = CE only
    roles: tuple[str, ...] = ()  # the teacher roles of its attention terms (a store-signal term picks its own)
    split: str | None = None  # the capability split it trains on (None: every sample, or --split where split_flag)
    split_flag: bool = False  # --split chooses the split (sft and the store-signal baselines)
    picks_role: bool = False  # its term reads the role --teacher-role names (default: the first holding the signal)
    mixes: bool = False  # per-sample mixing matrix M over its roles' terms (--recipe multi)

    def split_of(self, cfg) -> str | None:
        """The capability whose samples the run trains on (None: all)."""
        return cfg.split if self.split_flag else self.split

    def weighted_roles(self, cfg) -> list[str]:
        """Its attention roles whose term weight is > 0 (a weight of 0 switches a term off)."""
        return [r for r in self.roles if cfg.term_weight(r) > 0]


@dataclass
class TermForward:
    """What a term's loss reads from one student forward (B samples, T padded positions)."""

    out: Any  # the model output: .logits (B, P, V) at the answer positions; .hidden_states when asked for
    maps: dict[int, torch.Tensor]  # captured head-mean attention: student layer -> (B, T, T)
    text: torch.Tensor  # (B, T) bool: the text query set X
    vision: torch.Tensor  # (B, T) bool: the vision tokens V
    valid: torch.Tensor  # (B, T) bool: the attention mask (real tokens)
    cfg: Any  # the run's TrainConfig (full_reduction, kl_temperature, ...)
    autocast: Callable[[], contextlib.AbstractContextManager]  # a fresh autocast context of the forward's dtype
    state: torch.nn.Module | None = None  # the terms' trainable state (make_state), on the device


def batch_offset(inputs, lay) -> int:
    """Where sample `lay`'s position 0 sits in the padded batch (ModelInputs `inputs`)."""
    return inputs.tensors["input_ids"].shape[1] - lay.length if inputs.padding_side == "left" else 0


class Term(abc.ABC):
    """One kind of teacher term. Subclasses set the class attributes and override what differs."""

    name: str = ""  # registry key (and, for a store-signal term, its row name and recipe name)
    signals: tuple[str, ...] = ()  # the TermPlan.signal values this kind resolves to (how a plan finds its kind)
    store_signal: str | None = None  # the store signal it reads besides the role's attention maps (None: the maps)
    recipe: Recipe | None = None  # the recipe it adds to --recipe, if any

    # ----- planning (before any model loads): ConfigError naming the flag on a bad setting
    def on(self, cfg, recipe: Recipe) -> bool:
        """Whether the run has a term of this kind (some weight > 0)."""
        return cfg.w_kd > 0

    def roles(self, cfg, recipe: Recipe, source: TargetSource, student_L: int) -> list[str]:
        """The store roles its terms read (default: --teacher-role, else the first role whose
        signal resolves against --layers, else the first holding the signal)."""
        signal, have = self.store_signal, source.roles()
        fix = f"`drivekd-cache build --teacher ROLE --signals {signal}` adds them to the store (computing only what is missing)"
        if cfg.teacher_role is not None:
            if cfg.teacher_role not in have:
                raise ConfigError(f"--teacher-role {cfg.teacher_role}: the store has no such role (have {', '.join(have) or 'none'})")
            if signal not in source.role_info(cfg.teacher_role).signals:
                raise ConfigError(f"--teacher-role {cfg.teacher_role}: its store role holds no {signal}; "
                                  f"{fix.replace('ROLE', cfg.teacher_role)}")
            return [cfg.teacher_role]
        holding = [r for r in have if signal in source.role_info(r).signals]
        for r in holding if len(holding) > 1 else ():  # the first role that stores what the settings ask for
            try:
                self.resolve(cfg, [r], {r: source.role_info(r)}, student_L)
                return [r]
            except ConfigError:
                continue
        if holding:
            return [holding[0]]
        raise ConfigError(f"--recipe {cfg.recipe} reads the teacher's {signal}, but no role of the store "
                          f"({', '.join(have) or 'none'}) holds them (--cache); {fix}")

    def check_student(self, cfg, infos: dict[str, RoleInfo], family, student) -> None:
        """Refuse a student the term cannot be computed for (before the generic processor check)."""

    @abc.abstractmethod
    def resolve(self, cfg, roles: list[str], infos: dict[str, RoleInfo], student_L: int) -> list[TermPlan]:
        """The run's terms of this kind, resolved against the store's roles."""
        ...

    # ----- reading and collating targets (DataLoader workers)
    def reads(self, plan: TermPlan) -> tuple[list[int], dict | None]:
        """(attention-map layers, {signal: its layers or None}) to ask the TargetSource for."""
        return [], {self.store_signal: None}

    @abc.abstractmethod
    def collate(self, inputs, targets: list[SampleTargets], plan: TermPlan) -> dict:
        """One term's per-sample targets -> the batch's padded tensors (see each kind)."""
        ...

    # ----- the step
    def capture_layers(self, plan: TermPlan) -> list[int]:
        """Student layers whose head-mean attention the loss needs."""
        return []

    def hidden_layers(self, plan: TermPlan) -> list[int]:
        """Student layers whose hidden states the loss needs (the forward then returns them all)."""
        return []

    def make_state(self, plan: TermPlan, student_width: int) -> torch.nn.Module | None:
        """Trainable parameters the term owns beyond the student (trained, checkpointed with it)."""
        return None

    @abc.abstractmethod
    def loss(self, plan: TermPlan, fw: TermForward, targets: dict) -> torch.Tensor:
        """The per-sample loss (B,) against the batch's targets of this term."""
        ...
