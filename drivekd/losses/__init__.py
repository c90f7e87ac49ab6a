"""Drive-KD losses: answer-span CE and head-mean attention distillation (METHOD.md sections 3-4)."""

from drivekd.losses.attention import (
    KINDS,
    SIGNALS,
    answer_ce,
    answer_positions,
    attention_loss,
    causal_valid,
    full_attention_cosine,
    full_attention_mse,
    group_size,
    layer_groups,
    place_maps,
    t2v_cosine,
    t2v_mse,
    token_ce,
)
from drivekd.losses.hidden import HiddenProjection, hidden_mse
from drivekd.losses.kl import topk_kl
from drivekd.losses.recipes import TermPlan, plan_term

__all__ = [
    "KINDS", "SIGNALS", "TermPlan", "answer_ce",
    "answer_positions", "attention_loss", "causal_valid", "full_attention_cosine", "full_attention_mse", "group_size",
    "layer_groups", "place_maps", "plan_term", "t2v_cosine", "t2v_mse", "token_ce", "topk_kl", "hidden_mse", "HiddenProjection",
]
