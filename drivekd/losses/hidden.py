"""CE+Hidden baseline: MSE between projected student hidden states and the teacher's (METHOD.md 3).

Hidden states are the output of decoder layer l (HF `hidden_states[l + 1]`), compared at the text
positions the store holds (drivekd.store.signals says why those). When the widths differ the
student's state goes through a learned linear map (one per student layer), trained with the
student by the same optimizer; when they agree it is compared as is.
"""

from __future__ import annotations

import torch
from torch import nn


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over masked positions of the mean squared error over features: (B,).

    student, teacher (B, T, H); mask (B, T) bool. A sample without positions gets 0."""
    err = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, T)
    m = mask.to(err.dtype)
    return (err * m).sum(-1) / m.sum(-1).clamp_min(1)


class HiddenProjection(nn.Module):
    """Student width -> teacher width, one nn.Linear per student layer (identity when equal).

    Kept apart from the student model: its parameters join the optimizer and the step
    checkpoints (trainer_state.pt, "projection"), never the student's save_pretrained files, so
    `final/` loads as the plain student."""

    def __init__(self, student_layers: list[int], student_width: int, teacher_width: int):
        super().__init__()
        self.identity = student_width == teacher_width
        self.maps = nn.ModuleDict({} if self.identity else {str(s): nn.Linear(student_width, teacher_width) for s in student_layers})

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return h if self.identity else self.maps[str(layer)](h)
