"""Gradient-conflict handling (METHOD.md sections 6-7): lambda from the K x K Gram matrix of the
per-loss gradients (``coefficients``), two engines that get that Gram (rows: ``GradBuffers`` +
``combine``; ``GramEngine``: no rows held), and online loss re-weighting."""

from drivekd.projection.buffers import GradBuffers
from drivekd.projection.combine import MAX_ROWS, METHODS, coefficients, combine, gram
from drivekd.projection.gram_engine import GramEngine
from drivekd.projection.reweight import DynamicWeights, inverse_softplus

__all__ = ["METHODS", "MAX_ROWS", "coefficients", "combine", "gram", "GradBuffers", "GramEngine", "DynamicWeights",
           "inverse_softplus"]
