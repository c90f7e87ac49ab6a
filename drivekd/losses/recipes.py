"""Resolve an attention teacher term: its signal, loss kind and (student layer, teacher layers) pairs.

The recipe table (signal and layers per role) lives in `drivekd.roles`; the layer-spec grammar in
`drivekd.layers`. A spec is resolved separately against the student's and the teacher's depth, and
the two lists are paired by layer-group matching (METHOD.md section 4). `TermPlan` is the resolved
term of any kind; which kind (attention, logits, hidden, ...) handles it is the term registry's
business (`drivekd.terms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from drivekd.layers import LayerSpecError, resolve_layers
from drivekd.losses.attention import KINDS, SIGNALS, layer_groups
from drivekd.roles import RECIPE_LAYERS, RECIPE_SIGNAL


@dataclass(frozen=True)
class TermPlan:
    """One teacher term: its signal, loss kind, and (student layer, teacher layers) pairs."""

    role: str  # the store role whose targets the term reads
    signal: str  # "t2v" | "full" (attention), "logits" (--recipe kl) or "hidden" (--recipe hidden)
    kind: str  # "mse" | "cosine" | "kl"
    pairs: tuple[tuple[int, tuple[int, ...]], ...]  # (student layer, teacher layers); () for logits
    teacher_width: int | None = None  # hidden: the teacher's hidden size (the projection's output)
    # The term's row name (metrics, weights, batch targets): the term kind sets it ("kl", "hidden");
    # empty means the role (an attention term).
    row: str = ""

    @property
    def name(self) -> str:
        """The term's row name: its role for an attention term, else its kind's (kl / hidden)."""
        return self.row or self.role

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, ts in self.pairs for t in ts})


def plan_term(role: str, student_L: int, teacher_L: int, *, signal: str | None = None, kind: str = "mse",
              layers: str | None = None) -> TermPlan:
    """Resolve one attention term for a student of depth student_L and a teacher of depth teacher_L."""
    sig = signal or RECIPE_SIGNAL[role]
    if sig not in SIGNALS:
        raise LayerSpecError(f"signal must be one of {SIGNALS}, got {sig!r}")
    if kind not in KINDS:
        raise LayerSpecError(f"loss must be one of {KINDS}, got {kind!r}")
    spec = layers or RECIPE_LAYERS[role]
    s_layers = resolve_layers(spec, student_L)
    t_layers = resolve_layers(spec, teacher_L)
    return TermPlan(role, sig, kind, tuple(layer_groups(s_layers, t_layers)))
