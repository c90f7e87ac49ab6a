"""drivekd: capability-specific attention distillation (Drive-KD) for driving VLMs."""

__version__ = "0.1.0"
