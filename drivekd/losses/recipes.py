"""Resolve a teacher term: its signal, loss kind and (student layer, teacher layers) pairs.

The recipe table (signal and layers per role) lives in `drivekd.roles`; the layer-spec grammar in
`drivekd.layers`. A spec is resolved separately against the student's and the teacher's depth, and
the two lists are paired by layer-group matching (METHOD.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from drivekd.layers import LayerSpecError, resolve_layers
from drivekd.losses.attention import KINDS, SIGNALS, layer_groups
from drivekd.roles import RECIPE_LAYERS, RECIPE_SIGNAL


@dataclass(frozen=True)
class TermPlan:
    """One teacher term: its signal, loss kind, and (student layer, teacher layers) pairs."""

    role: str
    signal: str  # "t2v" | "full"
    kind: str  # "mse" | "cosine"
    pairs: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, ts in self.pairs for t in ts})


def plan_term(role: str, student_L: int, teacher_L: int, *, signal: str | None = None, kind: str = "mse",
              layers: str | None = None) -> TermPlan:
    """Resolve one teacher term for a student of depth student_L and a teacher of depth teacher_L."""
    sig = signal or RECIPE_SIGNAL[role]
    if sig not in SIGNALS:
        raise LayerSpecError(f"signal must be one of {SIGNALS}, got {sig!r}")
    if kind not in KINDS:
        raise LayerSpecError(f"loss must be one of {KINDS}, got {kind!r}")
    spec = layers or RECIPE_LAYERS[role]
    s_layers = resolve_layers(spec, student_L)
    t_layers = resolve_layers(spec, teacher_L)
    return TermPlan(role, sig, kind, tuple(layer_groups(s_layers, t_layers)))
