"""Counting a deep student from shallower copies of it: the step's counts are affine in the depth.

Why: a fake-tensor step costs ~0.4 ms per op on this CPU, and Qwen2.5-VL-3B's 36 text layers plus
32 vision layers (each window-attention layer runs one attention per window: ~100 windows for six
cameras) under the Gram engine's K-batched backward are ~10^6 ops: over 20 minutes. The step's
graph repeats one block per layer, so every counted quantity is affine in the number of layers:

* persistent bytes (weights, gradients, optimizer state, host state): parameters per layer x bytes;
* saved activations and the capture's maps and teacher targets at the peak: one set per layer
  (one target per student loss layer; the reasoning term has L - 1 loss layers, the others one);
* temporaries at the peak: those of one point of the backward, the same point at every depth;
* FLOPs: per layer, plus the embedding / head / losses.

A Qwen2.5-VL vision tower repeats a period of layers (7 window-attention layers, then one with full
attention: ``fullatt_block_indexes`` 7, 15, 23, 31), so its depth is counted in periods.

`counts = c0 + (L - a) * dL + (m - 1) * dm` is fitted from three reduced counts: text depths a and
b = a + 1 at one vision period, and depth a at two periods; a fourth count (b, 2 periods) checks
that the two depths add without interaction, and the fitted parameter count is checked against the
full model's (built on the meta device). Either check failing (or a layer spec that does not
resolve at the reduced depth) makes the planner count the full model. tests/test_planner.py checks
the extrapolation against a full count on a small config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# Text depths of the reduced copies: a >= 4 keeps the recipes' loss layers (0, L-2, 0..L-2, mid
# ranges 1..L-3) distinct and non-empty.
TEXT_A = 4
# Scale only when it saves work: a model at most this deep (text and vision) is counted directly.
DIRECT_MAX_LAYERS = 8


@dataclass(frozen=True)
class Depth:
    """A student's depth: text layers and vision periods of `period` layers each."""

    text: int
    vision_periods: int
    period: int


def depth_of(config, family: str) -> Depth | None:
    """The depth, or None when a tower does not repeat (then the model is counted directly)."""
    text = config.text_config
    types = getattr(text, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        return None  # mixed layer types (sliding + full) would need their own period
    vc = config.vision_config
    if family == "qwen2_5_vl":
        depth, full = int(vc.depth), list(getattr(vc, "fullatt_block_indexes", []) or [])
        period = (full[0] + 1) if full else depth
        if period <= 0 or depth % period or full != [period * (i + 1) - 1 for i in range(depth // period)]:
            return None
    else:
        depth, period = int(vc.num_hidden_layers), 1
    return Depth(int(text.num_hidden_layers), depth // period, period)


def worth_scaling(d: Depth | None) -> bool:
    return d is not None and (d.text > DIRECT_MAX_LAYERS or d.vision_periods * d.period > DIRECT_MAX_LAYERS) \
        and d.text >= TEXT_A + 1 and d.vision_periods >= 2


def reduced_config(config, family: str, text_layers: int, vision_periods: int):
    """A copy of `config` with `text_layers` decoder layers and `vision_periods` vision periods."""
    c = copy.deepcopy(config)
    d = depth_of(config, family)
    t = c.text_config
    t.num_hidden_layers = text_layers
    if getattr(t, "layer_types", None) is not None:
        t.layer_types = list(t.layer_types[:1]) * text_layers
    if getattr(t, "max_window_layers", None) is not None:
        t.max_window_layers = min(t.max_window_layers, text_layers)
    vc = c.vision_config
    if family == "qwen2_5_vl":
        vc.depth = vision_periods * d.period
        vc.fullatt_block_indexes = [d.period * (i + 1) - 1 for i in range(vision_periods)]
    else:
        vc.num_hidden_layers = vision_periods
    return c


def points() -> list[tuple[int, int]]:
    """(text layers, vision periods) of the reduced counts: three to fit, the last to check."""
    a, b = TEXT_A, TEXT_A + 1
    return [(a, 1), (b, 1), (a, 2), (b, 2)]


def extrapolate(values: dict[tuple[int, int], int], d: Depth) -> int | None:
    """One count at the full depth from the counts at `points()`; None when the check point shows
    an interaction between the two depths (the count is then not affine in them)."""
    (a, _), (b, _) = points()[:2]
    c0, cb, cm, cbm = (values[p] for p in points())
    dL, dm = cb - c0, cm - c0
    if cbm != c0 + dL + dm:
        return None
    return c0 + (d.text - a) * dL // (b - a) + (d.vision_periods - 1) * dm
