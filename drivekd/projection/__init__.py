"""Gradient handling (METHOD.md section 6): lambda from the K x K Gram matrix of the per-loss
gradients (``coefficients``), and two engines that get that Gram (rows: ``GradBuffers`` +
``combine``; ``GramEngine``: no rows held). Optimizers and the loss re-weighting are in drivekd.optim."""

from drivekd.projection.buffers import GradBuffers
from drivekd.projection.combine import MAX_ROWS, METHODS, coefficients, combine, gram
from drivekd.projection.gram_engine import GramEngine

__all__ = ["METHODS", "MAX_ROWS", "coefficients", "combine", "gram", "GradBuffers", "GramEngine"]
