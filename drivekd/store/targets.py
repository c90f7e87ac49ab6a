"""Where teacher signals come from: one interface, two sources.

The trainer asks a `TargetSource` for a sample's teacher maps and never knows whether they come
from the Zarr store (`drivekd.store.zarr_store.TeacherStore`, the normal case) or from memory
(`InMemoryTargets`: tests, or targets computed on the fly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from drivekd.errors import StoreError
from drivekd.roles import ROLES


@dataclass
class LogitTargets:
    """The teacher's next-token distribution at a sample's answer positions (drivekd.store.signals)."""

    positions: torch.Tensor  # (A,) long: positions t whose next label t+1 the CE uses
    logprobs: torch.Tensor  # (A, k) fp32: top-k log-probabilities, descending
    index: torch.Tensor  # (A, k) long: their token ids
    log_tail: torch.Tensor  # (A,) fp32: log of the mass outside the top-k


@dataclass
class HiddenTargets:
    """The teacher's hidden states at a sample's text positions, per teacher layer."""

    positions: torch.Tensor  # (X,) long
    layers: dict[int, torch.Tensor]  # teacher layer -> (X, H) fp32


@dataclass
class SampleTargets:
    """One sample's teacher targets for one role."""

    sample_id: str
    fingerprint: str  # sha256 of the teacher's token ids; must equal the student's
    vision: torch.Tensor  # (T,) bool
    text: torch.Tensor  # (T,) bool
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> (T, T) fp32, zero above the diagonal
    logits: LogitTargets | None = None  # when asked for (signals={"logits": None})
    hidden: HiddenTargets | None = None  # when asked for (signals={"hidden": [layers]})

    @property
    def length(self) -> int:
        return int(self.vision.numel())


@dataclass(frozen=True)
class RoleInfo:
    role: str
    layers: tuple[int, ...]  # teacher decoder-layer indices stored for this role
    num_teacher_layers: int  # L of the teacher (recipes use L-2 etc.)
    teacher: str  # teacher fingerprint
    family: str
    processor: str  # processor/chat-template fingerprint
    # Signals besides attention and their settings (drivekd.store.signals): {"logits": {"top_k", "tokenizer_size",
    # "tokenizer_fingerprint", "vocab_size"}, "hidden": {"layers", "hidden_size", "positions"}}
    signals: dict = field(default_factory=dict, hash=False, compare=False)


class TargetSource(Protocol):
    def roles(self) -> list[str]: ...

    def role_info(self, role: str) -> RoleInfo: ...

    def get(self, role: str, sample_id: str, layers: list[int] | None = None, signals: dict | None = None) -> SampleTargets: ...


class InMemoryTargets:
    """A `TargetSource` over a dict {role: {sample_id: SampleTargets}}."""

    def __init__(self, infos: dict[str, RoleInfo], targets: dict[str, dict[str, SampleTargets]]):
        self._infos = infos
        self._targets = targets

    def roles(self) -> list[str]:
        return [r for r in ROLES if r in self._infos]

    def role_info(self, role: str) -> RoleInfo:
        if role not in self._infos:
            raise StoreError(f"role {role!r} is not in the targets (have: {', '.join(self.roles()) or 'none'})")
        return self._infos[role]

    def get(self, role: str, sample_id: str, layers: list[int] | None = None, signals: dict | None = None) -> SampleTargets:
        info = self.role_info(role)
        t = self._targets.get(role, {}).get(sample_id)
        if t is None:
            raise StoreError(f"sample {sample_id!r} has no {role} targets")
        want = list(info.layers) if layers is None else list(layers)
        missing = [l for l in want if l not in t.maps]
        if missing:
            raise StoreError(f"sample {sample_id!r}, role {role}: layers {missing} not stored (have {sorted(t.maps)})")
        for name in signals or {}:
            if getattr(t, name) is None:
                raise StoreError(f"sample {sample_id!r}, role {role}: no {name} targets")
        return SampleTargets(t.sample_id, t.fingerprint, t.vision, t.text, {l: t.maps[l] for l in want},
                             t.logits if signals and "logits" in signals else None, t.hidden if signals and "hidden" in signals else None)
