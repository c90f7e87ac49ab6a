"""The student as the step trains it: `prepare_student` (training mode, checkpointing, --freeze /
--lora) and `autocast_dtype` (--dtype on the run's device).

Shared by the training loop and the planner (drivekd/planner/plan.py counts the same step), so they
live below both: the loop may then ask the planner for the run's planned peak without an import circle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from drivekd.trainer import trainable
from drivekd.trainer.settings import TrainConfig


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """--dtype resolved on `device` (auto: bf16 on GPU, fp32 on CPU); None = no autocast."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return None if dtype == "float32" else getattr(torch, dtype)


def prepare_student(model, cfg: TrainConfig, resume_dir: Path | None = None):
    """Training mode, no KV cache, (--gradient-checkpointing) non-reentrant checkpointing: the
    capture then records the maps again during the recomputation, inside its block; then
    --freeze / --lora (a LoRA student comes back as a PeftModel, its adapter from `resume_dir`).
    Returns the model to train."""
    model.train()
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return trainable.setup(model, cfg, resume_dir)


__all__ = ["autocast_dtype", "prepare_student"]
