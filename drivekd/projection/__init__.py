"""Gradient-conflict handling (METHOD.md sections 6-7): combine per-loss gradient rows with
AGP / G1 / G2 / none on their Gram matrix, the per-loss gradient buffers autograd writes into, and
online loss re-weighting."""

from drivekd.projection.buffers import GradBuffers
from drivekd.projection.combine import MAX_ROWS, METHODS, combine, gram
from drivekd.projection.reweight import DynamicWeights, inverse_softplus

__all__ = ["METHODS", "MAX_ROWS", "combine", "gram", "GradBuffers", "DynamicWeights", "inverse_softplus"]
