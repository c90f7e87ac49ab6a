"""What updates the weights, apart from how the per-loss gradients are combined (drivekd.projection):
AdamW for each --precision (fp32, or bf16 weights with Kahan / offloaded / stochastic-rounding state:
``precision``), and the online re-weighting of the loss weights (METHOD.md section 7: ``reweight``),
itself trained with a small AdamW."""

from drivekd.optim.precision import PRECISIONS, BF16AdamW, make_optimizer, param_dtype
from drivekd.optim.reweight import DynamicWeights, inverse_softplus

__all__ = ["PRECISIONS", "BF16AdamW", "make_optimizer", "param_dtype", "DynamicWeights", "inverse_softplus"]
