"""Counting a deep student from shallower copies of it: the step's counts are affine in the depth.

Why: a fake-tensor step costs ~0.3 ms per op on this CPU, and Qwen2.5-VL-3B at six cameras under the
Gram engine's K-batched backward takes ~20k ops per text layer and ~27k per vision window-attention
layer (one attention per window, ~100 windows) on top of ~50k for the rest (counted by
tools/bench_gram.py-style op counts on reduced copies): ~1.6M ops, over 10 minutes here. The
step's graph repeats one block per layer, so every counted quantity is affine in the number of
layers of each kind:

* persistent bytes (weights, gradients, optimizer state, host state): parameters per layer x bytes;
* saved activations, the capture's maps and teacher targets at the peak: one set per layer (one
  target per student loss layer; the reasoning term has L - 1 loss layers, the others one);
* temporaries at the peak: those of one point of the backward, the same point at every depth;
* FLOPs: per layer, plus the embedding / head / losses.

Layer kinds (the family's: `Family.depth`, `Family.vision_layer_kinds`): text decoder layers;
vision layers, which for Qwen2.5-VL are two kinds (window attention, and full attention at
``fullatt_block_indexes``), for InternVL one.

``counts = c(base) + (L - a) * d_text + sum_k (n_k - 1) * d_k`` is fitted from 2 + kinds reduced
counts (base: a text layers and one vision layer of each kind; then one more of each kind), and the
fitted parameter count must equal the full model's (built on the meta device); a layer spec that
does not resolve at the reduced depth, or a mismatch, makes the planner count the full model.
tests/test_planner.py checks the extrapolation against a full count, category by category.
"""

from __future__ import annotations

from drivekd.families.base import Depth, family_class

# Text depth of the reduced copies: a >= 4 keeps the recipes' loss layers (0, L-2, 0..L-2, mid
# ranges 1..L-3) distinct and non-empty.
TEXT_A = 4
# Count directly when the student has at most this many layers (text + vision): InternVL3-1B (48)
# takes ~40 s here; scaling pays from Qwen2.5-VL-3B's 68 on.
DIRECT_MAX_LAYERS = 48


def depth_of(config, family: str) -> Depth | None:
    """The family's depth of `config`, or None when the text layers are not all of one type (mixed
    sliding + full attention would be kinds of their own: then counted directly)."""
    d = family_class(family).depth(config)
    return d if d.uniform_text else None


def worth_scaling(d: Depth | None) -> bool:
    return d is not None and d.text + sum(d.vision) > DIRECT_MAX_LAYERS and d.text > TEXT_A and min(d.vision) >= 1


def reduced_config(config, family: str, depth: Depth):
    """A copy of `config` at `depth` (Qwen2.5-VL: the full-attention vision layers last)."""
    return family_class(family).with_depth(config, depth)


def points(family: str) -> list[Depth]:
    """The reduced depths counted: the base, then one more text layer, then one more of each vision kind."""
    n = len(family_class(family).vision_layer_kinds)
    base = Depth(TEXT_A, (1,) * n)
    more = [Depth(TEXT_A, tuple(2 if i == k else 1 for i in range(n))) for k in range(n)]
    return [base, Depth(TEXT_A + 1, base.vision), *more]


def extrapolate(values: list[int], d: Depth) -> int:
    """One count at depth `d` from its values at `points()` (same order)."""
    base, text, *kinds = values
    out = base + (d.text - TEXT_A) * (text - base)
    for n, v in zip(d.vision, kinds):
        out += (n - 1) * (v - base)
    return out
