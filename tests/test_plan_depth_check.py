"""The depth-scaled count (planner/scale.py) checks that the step is affine in the depth before it
extrapolates: a phase's peak that moves to another point of the step between the reduced copies
(as InternVL3-8B's micro-step peak does between 4 and 5 text layers with --projection none
--no-dynamic-weights --gradient-checkpointing, which gave 25.7 GiB of activations) must not be
extrapolated from the copies that straddle the move.

The counts here are synthetic (count_step replaced by a peak that is the larger of two affine
candidates, as the real step's is), so the fitting logic is checked exactly and in well under a
second; tests/test_planner.py checks real reduced counts against a real full count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drivekd.planner import plan as P
from drivekd.planner import scale
from drivekd.trainer.plan import student_depth
from drivekd.trainer.settings import TrainConfig
from conftest import config_copy


def _peak(at_b: bool, t: int) -> dict[str, int]:
    """The micro-step's categories at its peak for `t` text layers: point A (e.g. the LM head's
    backward) or point B (inside a layer's recompute), each affine in t, B with the steeper slope."""
    if at_b:
        return {"activations": 60 + t, "temporaries": 28 + 7 * t}  # total 88 + 8t: above A from 5 text layers
    return {"activations": 10 + t, "temporaries": 100 + 2 * t}  # total 110 + 3t


def fake_count_step(at_b, update_extra=None):
    """count_step, replaced: the micro-step's peak is at B where `at_b(depth)` says; the update's
    temporaries are the weights' size (AdamW's foreach), or `update_extra(text layers)` bytes."""
    def count_step(cfg, plan, shapes, config, *, fake=True, model=None, device_memory=None):
        with torch.device("meta"):
            params = sum(p.numel() for p in P.build_student(cfg.student, shapes.family, config).parameters())
        d = scale.depth_of(config, shapes.family)
        fixed = {"weights": 4 * params, "gradients": 4 * params, "grad_rows": 0, "optimizer_state": 8 * params,
                 "teacher_targets": 7 * d.text, "inputs": 5, "maps": 0}
        micro = {**fixed, **_peak(at_b(d), d.text)}
        update = {**fixed, "activations": 0, "temporaries": 4 * params if update_extra is None else update_extra(d.text)}
        cats = max((micro, update), key=lambda c: sum(c.values()))
        return P.Counted(dict(cats), sum(cats.values()), 1000 * d.text + 10 * sum(d.vision), params, 0, None, "none", "",
                         trainable=params, phases={"micro": micro, "update": update})
    return count_step


@pytest.fixture
def deep(tiny_models, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(scale, "DIRECT_MAX_LAYERS", 6)  # scale the tiny student as a deep one
    return config_copy(tiny_models / "internvl-student", tmp_path / "deep", text=12, vision=2)


def _scaled_and_direct(student: Path, monkeypatch, at_b, update_extra=None) -> tuple[P.Counted, P.Counted]:
    monkeypatch.setattr(P, "count_step", fake_count_step(at_b, update_extra))
    cfg = TrainConfig(student=student, recipe="multi", projection="none", dynamic_weights=False, dtype="float32")
    family, L = student_depth(student)
    config = P.student_config(student)
    shapes = P.shapes_for(family, config, student, 1, 320, cfg.image_settings)
    scaled = P.count_at_depth(cfg, L, family, None, shapes, config)
    monkeypatch.setenv("DRIVEKD_PLAN_DIRECT", "1")
    direct = P.count_at_depth(cfg, L, family, None, shapes, config)
    return scaled, direct


def test_a_peak_that_moves_between_the_copies_is_not_extrapolated(deep, monkeypatch):
    """Peak at A for 4 text layers, at B from 5 on: the fit from 4 and 5 (the old one) put 4 + 8 x 51
    units of activations and negative temporaries into the 12-layer micro-step; the checked fit moves
    its base to 5 layers and equals the full count in every phase."""
    scaled, direct = _scaled_and_direct(deep, monkeypatch, lambda d: d.text >= 5)
    assert scaled.scaled_from.startswith("text+vision layers 5+1")  # the base moved up one text layer
    assert scaled.phases == direct.phases
    assert scaled.categories == direct.categories
    assert (scaled.peak, scaled.flops, scaled.params) == (direct.peak, direct.flops, direct.params)


def test_a_count_never_affine_at_the_copies_is_counted_in_full(deep, monkeypatch):
    """The peak moves with the vision depth (B from two vision layers on, a steeper text slope): every
    shifted base's check fails, and the planner counts every layer."""
    scaled, direct = _scaled_and_direct(deep, monkeypatch, lambda d: d.vision[0] >= 2)
    assert not scaled.scaled_from
    assert scaled.phases == direct.phases and scaled.categories == direct.categories


def test_the_step_peak_is_the_larger_phase_at_the_full_depth(deep, monkeypatch):
    """Each phase is affine, their maximum is not: the update phase is the larger at the reduced depths
    and the micro-step at 12 layers (as Qwen2.5-VL-7B's SFT count at six cameras: micro-step 174.7 GB,
    update 165.9 GB). The step's categories are the larger phase's at the full depth, not an
    extrapolation of the reduced copies' larger phase."""
    # micro-step: fixed + 110 + 3t; update: fixed + 125 + t: the micro-step is larger from 8 text layers
    scaled, direct = _scaled_and_direct(deep, monkeypatch, lambda d: False, lambda t: 125 + t)
    assert scaled.scaled_from
    assert direct.categories == direct.phases["micro"]
    assert scaled.categories == direct.categories and scaled.peak == direct.peak
