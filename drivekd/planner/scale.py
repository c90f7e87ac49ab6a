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

The "same point at every depth" holds only past a few layers: a phase's peak is the larger of
several candidate points (e.g. the end of the forward vs. a point inside the backward), each affine
in the depth, and the one that wins can change between the smallest copies. Measured: InternVL3-8B,
multi, --projection none --no-dynamic-weights --gradient-checkpointing, six 256-token cameras: the
micro-step's peak at 4 text layers holds 0.28 GiB of activations and 3.11 GiB of temporaries, at 5
layers 1.32 and 2.36, at 6 layers 1.34 and 2.81 (+0.024 GiB saved per layer from 5 on, the layer's
(1, T, D) fp32 input). Fitting on 4 and 5 extrapolated 25.7 GiB of activations and -15.0 GiB of
temporaries to 28 layers (the direct count: 2.4 and 13.2). So every fit is checked against one
more count (`check_point`: two more text layers and one more of each vision kind than the base),
every category of every phase; on a mismatch the base moves up one text layer (up to
TEXT_A + MAX_SHIFT), then the planner counts the full model. For the same reason the step's peak is
taken at the full depth as the larger of the extrapolated phases (micro-step, update), not
extrapolated itself: Qwen2.5-VL-7B's SFT step at six cameras peaks in the update at the reduced
depths and in the micro-step at 28 layers (174.7 GB against 165.9).
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


# Text layers the base may move up when a fit fails its check (see the module's docstring).
MAX_SHIFT = 2


def points(family: str, a: int = TEXT_A) -> list[Depth]:
    """The reduced depths counted: the base (`a` text layers), then one more text layer, then one
    more of each vision kind."""
    n = len(family_class(family).vision_layer_kinds)
    base = Depth(a, (1,) * n)
    more = [Depth(a, tuple(2 if i == k else 1 for i in range(n))) for k in range(n)]
    return [base, Depth(a + 1, base.vision), *more]


def check_point(family: str, a: int = TEXT_A) -> Depth:
    """The depth a fit on `points(family, a)` is checked at: two more text layers and one more of
    each vision kind than the base (every slope used, the text one twice)."""
    n = len(family_class(family).vision_layer_kinds)
    return Depth(a + 2, (2,) * n)


def extrapolate(values: list[int], d: Depth, a: int = TEXT_A) -> int:
    """One count at depth `d` from its values at `points(family, a)` (same order)."""
    base, text, *kinds = values
    out = base + (d.text - a) * (text - base)
    for n, v in zip(d.vision, kinds):
        out += (n - 1) * (v - base)
    return out
