"""Which attention loss each teacher term uses, at which layers (METHOD.md sections 4-5).

| role       | signal | layers (student and teacher, each resolved against its own depth L) |
|------------|--------|---------------------------------------------------------------------|
| perception | t2v    | 0                                                                   |
| reasoning  | full   | 0..L-2 with layer-group matching ("mid2": 1..L-3)                   |
| planning   | t2v    | L-2                                                                 |

Layer specs (the `--layers` flag): comma-separated items, each an index `N`, a negative index
`-N` (= L-N), `L-N`, or an inclusive range `A..B` of those, e.g. "0", "L-2", "1..L-3", "0,2".
A spec is resolved separately against the student's and the teacher's depth, and the two lists are
paired by layer-group matching, so "L-2" means each model's penultimate layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from drivekd.losses.attention import KINDS, SIGNALS, layer_groups

ROLES = ("perception", "reasoning", "planning")
DEFAULT_SIGNAL = {"perception": "t2v", "reasoning": "full", "planning": "t2v"}
DEFAULT_LAYERS = {"perception": "0", "reasoning": "0..L-2", "planning": "L-2"}

_ITEM = re.compile(r"^(?:L-(\d+)|(-?\d+))$")


class LayerSpecError(ValueError):
    """A malformed or out-of-range layer spec (the caller names the flag)."""


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


def _index(item: str, L: int) -> int:
    m = _ITEM.match(item.strip())
    if not m:
        raise LayerSpecError(f"{item!r} is not a layer index (use N, -N, L-N or A..B)")
    i = L - int(m.group(1)) if m.group(1) is not None else int(m.group(2))
    if i < 0:
        i += L
    if not 0 <= i < L:
        raise LayerSpecError(f"layer {item.strip()!r} is out of range for a model with {L} decoder layers (0..{L - 1})")
    return i


def resolve_layers(spec: str, L: int) -> list[int]:
    """A layer spec -> sorted unique 0-based indices of a model with L decoder layers."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            a, b = part.split("..", 1)
            i, j = _index(a, L), _index(b, L)
            if j < i:
                raise LayerSpecError(f"range {part!r} is empty ({i} > {j} for {L} layers)")
            out.extend(range(i, j + 1))
        else:
            out.append(_index(part, L))
    if not out:
        raise LayerSpecError(f"layer spec {spec!r} selects no layer")
    return sorted(set(out))


def mid_range_spec(name: str) -> str:
    """'midN' -> the reasoning range N-1..L-1-N ('mid1' = default 0..L-2, 'mid2' = 1..L-3)."""
    m = re.fullmatch(r"mid(\d+)", name.strip())
    if not m or int(m.group(1)) < 1:
        raise LayerSpecError(f"{name!r} is not a mid range (use mid1, mid2, ...)")
    n = int(m.group(1))
    return f"{n - 1}..L-{n + 1}"


def parse_role_layers(spec: str | None, roles: list[str]) -> dict[str, str]:
    """The --layers value -> {role: spec}. A bare spec applies to a single role; several roles
    need 'role=SPEC;role=SPEC' (roles not named keep their recipe layers)."""
    if not spec:
        return {}
    if "=" not in spec:
        if len(roles) != 1:
            raise LayerSpecError("with several teacher terms give layers per role, e.g. 'perception=0;planning=L-2'")
        return {roles[0]: spec}
    out = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        role, _, s = part.partition("=")
        role = role.strip()
        if role not in roles:
            raise LayerSpecError(f"role {role!r} is not a teacher term of this recipe ({', '.join(roles)})")
        out[role] = s.strip()
    return out


def plan_term(role: str, student_L: int, teacher_L: int, *, signal: str | None = None, kind: str = "mse",
              layers: str | None = None) -> TermPlan:
    """Resolve one teacher term for a student of depth student_L and a teacher of depth teacher_L."""
    sig = signal or DEFAULT_SIGNAL[role]
    if sig not in SIGNALS:
        raise LayerSpecError(f"signal must be one of {SIGNALS}, got {sig!r}")
    if kind not in KINDS:
        raise LayerSpecError(f"loss must be one of {KINDS}, got {kind!r}")
    spec = layers or DEFAULT_LAYERS[role]
    s_layers = resolve_layers(spec, student_L)
    t_layers = resolve_layers(spec, teacher_L)
    return TermPlan(role, sig, kind, tuple(layer_groups(s_layers, t_layers)))
