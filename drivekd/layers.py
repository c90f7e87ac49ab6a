"""The one layer-spec grammar, used by `drivekd-cache build --layers` and `drivekd-train --layers`.

A spec is comma-separated items, each an index `N`, a negative index `-N` (= L-N), `L-N`, or an
inclusive range `A..B` of those: "0", "L-2", "1..L-3", "0,2", "0..L-2". A spec names layers of a
model of depth L and is resolved against each model's own depth, so "L-2" is each model's
penultimate layer. Several teacher terms take 'role=SPEC;role=SPEC'. Indices are 0-based decoder
layers (HF `layer_idx`): the paper's "Layer 1" is 0.
"""

from __future__ import annotations

import re

from drivekd.roles import RECIPE_LAYERS

_ITEM = re.compile(r"^(?:L-(\d+)|(-?\d+))$")


class LayerSpecError(ValueError):
    """A malformed or out-of-range layer spec (the caller names the flag)."""


def _index(item: str, L: int) -> int:
    m = _ITEM.match(item.strip())
    if not m:
        raise LayerSpecError(f"{item.strip()!r} is not a layer index (use N, -N, L-N or a range A..B, e.g. 0..L-2)")
    # `L-N` and `-N` both mean index L-N, once: an N larger than L is out of range, never wrapped
    # round again (L-9 on a 6-layer model once silently selected layer 3).
    i = L - int(m.group(1)) if m.group(1) is not None else int(m.group(2))
    if m.group(2) is not None and i < 0:
        i += L
    if not 0 <= i < L:
        raise LayerSpecError(f"layer {item.strip()!r} is out of range for a model with {L} decoder layers (0..{L - 1})")
    return i


def check_spec(spec: str) -> None:
    """Syntax check without a depth (before any model is read): LayerSpecError on a malformed spec."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise LayerSpecError(f"layer spec {spec!r} selects no layer")
    for part in parts:
        for item in part.split("..", 1) if ".." in part else [part]:
            if not _ITEM.match(item.strip()):
                raise LayerSpecError(f"{item.strip()!r} is not a layer index (use N, -N, L-N or a range A..B, e.g. 0..L-2)")


def resolve_layers(spec: str, L: int) -> list[int]:
    """A layer spec -> sorted unique 0-based indices of a model with L decoder layers."""
    out: list[int] = []
    for part in str(spec).split(","):
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


def spec_of(value) -> str:
    """A spec string from what a config file may hold: a spec string, an int, or a list of ints/specs."""
    if isinstance(value, bool):
        raise LayerSpecError(f"{value!r} is not a layer spec")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise LayerSpecError("an empty list selects no layer")
        return ",".join(spec_of(v) for v in value)
    if isinstance(value, str):
        return value
    raise LayerSpecError(f"{value!r} is not a layer spec (write e.g. \"0\", \"L-2\" or \"0..L-2\")")


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
        check_spec(spec)
        return {roles[0]: spec}
    out = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        role, _, s = part.partition("=")
        role = role.strip()
        if role not in roles:
            raise LayerSpecError(f"role {role!r} is not a teacher term of this recipe ({', '.join(roles)})")
        check_spec(s.strip())
        out[role] = s.strip()
    return out


def recipe_layers(role: str, L: int) -> list[int]:
    """Teacher layers a role's recipes need, 0-based; the reasoning range 0..L-2 also covers mid2."""
    return resolve_layers(RECIPE_LAYERS[role], L)
