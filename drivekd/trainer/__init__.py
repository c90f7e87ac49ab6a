"""The student trainer: config validation, training loop, checkpoints."""

from drivekd.trainer.settings import TrainConfig
from drivekd.trainer.loop import train

__all__ = ["TrainConfig", "train"]
