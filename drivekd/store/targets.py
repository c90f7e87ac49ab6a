"""Where teacher signals come from: one interface, two sources.

The trainer asks a `TargetSource` for a sample's teacher maps and never knows whether they come
from the Zarr store (`drivekd.store.TeacherStore`, the normal case) or from memory
(`drivekd.store.memory.InMemoryTargets`: tests, or targets computed on the fly by
`drivekd.teacher.online`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch



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
    input_ids: torch.Tensor | None = None  # (T,) int64 teacher token ids, where a source keeps them with the targets

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
    """Where a run's teacher targets come from: the whole contract, nothing reached by probing.

    Implemented by the Zarr store (`drivekd.store.TeacherStore`) and by memory
    (`drivekd.store.memory.InMemoryTargets`, filled by `drivekd.teacher.online.compute_targets` or
    by hand). A new backend implements every method below; the trainer calls nothing else.

    Shapes: T = the sample's token count (teacher = student tokens), L = the role's stored teacher
    layers. Statuses are one of 'complete', 'skipped' (bad input when the targets were made; the
    trainer leaves the sample out), 'incomplete' (started, not finished) or 'missing'.
    """

    def roles(self) -> list[str]:
        """The roles held, in ROLES order."""
        ...

    def role_info(self, role: str) -> RoleInfo:
        """What the trainer checks a run against: stored layers, teacher depth, fingerprints, signals.
        Raises StoreError naming the roles held when `role` is not one of them."""
        ...

    def role_meta(self, role: str) -> dict:
        """The role's build metadata as recorded (encoding, text_tokens, image_settings, sample_ids, ...);
        keys a source does not know are absent. Raises StoreError for a role not held."""
        ...

    def sample_status(self, role: str, sample_id: str) -> str:
        """The status of the sample's attention targets (the base every sample has); cheap, no array read."""
        ...

    def signal_status(self, role: str, sample_id: str, name: str) -> str:
        """The status of signal `name` ('attention', 'logits', 'hidden') of a sample: 'complete' only when
        the sample is complete and carries that signal."""
        ...

    def get(self, role: str, sample_id: str, layers: list[int] | None = None, signals: dict | None = None) -> SampleTargets:
        """A complete sample's targets: maps {teacher layer: (T, T) fp32} for `layers` (None = every stored
        one, [] = none), masks (T,) bool, and the signals asked for ({"logits": None, "hidden": [layers]}).
        Raises StoreError when the sample, a layer or a signal is not held."""
        ...

    def read_input_ids(self, role: str, sample_id: str) -> torch.Tensor | None:
        """The teacher's token ids (T,) int64, for naming the first position where a student differs;
        None when the source does not hold token ids (then the masks locate the difference)."""
        ...

    def fingerprint(self, role: str, sample_id: str) -> str | None:
        """sha256 of the sample's teacher token ids (what the student's must equal), no array read;
        None when the sample is not complete."""
        ...

    def content_digest(self, role: str, sample_ids: list[str]) -> str:
        """A digest of the stored values these samples' attention targets hold: equal digests, equal
        targets (a resumed run checks it). Signals besides attention are not digested."""
        ...
