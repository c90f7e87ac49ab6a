"""The planner's depth scaling under the Gram engine's cut (step.cut_layer): the step's counts are
affine in the depth only while the number of decoder layers above the cut is; when a layer spec
moves the cut otherwise, the planner counts every layer instead of extrapolating.

count_step is stubbed (its real counts are checked against a full count in
tests/test_planner.py::test_depth_scaled_count_equals_the_full_count): here only the choice between
scaling and counting directly is under test.
"""

from __future__ import annotations

import pytest
import torch

from drivekd.planner import plan as P
from drivekd.planner import scale
from drivekd.trainer.plan import student_depth
from drivekd.trainer.settings import TrainConfig
from conftest import config_copy


@pytest.mark.parametrize("layers,scaled", [
    ("0", True),  # cut at layer 1 at every depth: the layers above it grow one per layer (affine)
    ("L-2", True),  # cut at the top layer at every depth: one layer above it (affine)
    # depths 4 / 5 / 8: loss layers {1, 3} / {2, 3} / {3, 5}, cut at the head / 4 / 6: 0, 1, then 2
    # layers above it, where the reduced copies extrapolate to 4.
    ("3,L-3", False),
])
def test_scaling_only_where_the_cut_moves_affinely(tiny_models, tmp_path, monkeypatch, layers, scaled):
    monkeypatch.setattr(scale, "DIRECT_MAX_LAYERS", 6)
    student = config_copy(tiny_models / "internvl-student", tmp_path / "s", text=8, vision=2)
    cfg = TrainConfig(student=student, recipe="perception", layers=layers, projection="agp", grad_engine="gram",
                      dtype="float32")
    family, L = student_depth(student)
    assert L == 8
    config = P.student_config(student)
    seen = []

    def stub(cfg_, plan, shapes, conf, **kw):  # the parameter count of the depth counted, nothing run
        seen.append(plan.student_layers_total)
        with torch.device("meta"):
            n = sum(p.numel() for p in P.build_student(cfg_.student, family, conf, torch.float32).parameters())
        return P.Counted({"weights": n}, n, n, n, 0, engine="gram", trainable=n, phases={"micro": {"weights": n}, "update": {"weights": n}})

    monkeypatch.setattr(P, "count_step", stub)
    got = P.count_at_depth(cfg, L, family, None, None, config)
    assert bool(got.scaled_from) is scaled
    # the fit's check count (6 text layers), or the full depth counted directly
    assert seen[-1] == (scale.check_point(family).text if scaled else 8) and (max(seen) < L) is scaled
