"""The three capabilities, the teacher roles that teach them, and each role's recipe (METHOD.md 1, 4-5).

Every sample carries one capability label; each teacher role teaches one capability, so the two
lists are the same names in the same order. That order is the mixing matrix's: rows = a sample's
capability, columns = the teacher (perception, reasoning, planning).

| role       | signal | layers (each resolved against its own model's depth L) |
|------------|--------|--------------------------------------------------------|
| perception | t2v    | 0                                                      |
| reasoning  | full   | 0..L-2, layer-group matched ("mid2": 1..L-3)           |
| planning   | t2v    | L-2                                                    |

Layer specs follow the one grammar of `drivekd.layers`.
"""

from __future__ import annotations

CAPABILITIES = ("perception", "reasoning", "planning")
ROLES = CAPABILITIES  # one teacher role per capability, same order (the mixing matrix's columns)

RECIPE_SIGNAL = {"perception": "t2v", "reasoning": "full", "planning": "t2v"}
RECIPE_LAYERS = {"perception": "0", "reasoning": "0..L-2", "planning": "L-2"}

# Label id that cross-entropy ignores (image, user-turn and padding positions): torch's default.
IGNORE_INDEX = -100


def role_index(role: str) -> int:
    """Column of `role` in the mixing matrix (ValueError naming the valid roles otherwise)."""
    try:
        return ROLES.index(role)
    except ValueError:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}") from None


def capability_index(capability: str) -> int:
    """Row of a sample's capability in the mixing matrix."""
    try:
        return CAPABILITIES.index(capability)
    except ValueError:
        raise ValueError(f"unknown capability {capability!r}; capabilities are {', '.join(CAPABILITIES)}") from None
