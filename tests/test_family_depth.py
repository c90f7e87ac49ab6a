"""Depth and layer kinds come from the family (`Family.depth`), read from config.json in one place."""

from pathlib import Path

import pytest

from drivekd.families import Depth, InternVLFamily, Qwen25VLFamily, checkpoint_depth, family_class
from drivekd.planner import scale

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.mark.parametrize("name, family, depth", [
    ("InternVL3-1B-hf", "internvl", Depth(24, (24,))),
    ("InternVL3-8B-hf", "internvl", Depth(28, (24,))),
    # 32 vision layers: full attention at 7, 15, 23, 31, window attention in the other 28
    ("Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", Depth(36, (28, 4))),
    ("Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", Depth(28, (28, 4))),
])
def test_real_config_depths(name, family, depth):
    assert checkpoint_depth(CONFIGS / name) == (family, depth)


def test_tiny_depths_and_kinds(tiny_models):
    assert checkpoint_depth(tiny_models / "internvl-student")[1].text == 4
    assert checkpoint_depth(tiny_models / "internvl-teacher")[1].text == 6
    fam, d = checkpoint_depth(tiny_models / "qwen2_5_vl-student")
    assert len(d.vision) == len(family_class(fam).vision_layer_kinds) == 2
    assert InternVLFamily.vision_layer_kinds == ("layer",) and Qwen25VLFamily.vision_layer_kinds == ("window", "full")


@pytest.mark.parametrize("name", ["InternVL3-1B-hf", "Qwen2.5-VL-3B-Instruct"])
def test_with_depth_gives_that_depth(name):
    """The planner's reduced copies (planner/scale.py) have the depth they ask for, layer kind by kind,
    and build as real models of that depth."""
    import torch

    from drivekd.planner.plan import build_student, student_config

    family, _ = checkpoint_depth(CONFIGS / name)
    fam = family_class(family)
    small = Depth(5, (2,) * len(fam.vision_layer_kinds))
    conf = fam.with_depth(student_config(CONFIGS / name), small)
    assert fam.depth(conf) == small
    with torch.device("meta"):
        model = build_student(CONFIGS / name, family, conf)
    assert len(model.model.language_model.layers) == 5
    assert sum(small.vision) == len(model.model.vision_tower.encoder.layer if family == "internvl" else model.model.visual.blocks)


def test_mixed_text_layer_types_are_not_scaled():
    """A text model of several layer types (sliding + full attention) is a kind the extrapolation
    does not model: the planner counts it directly."""
    from drivekd.planner.plan import student_config

    conf = student_config(CONFIGS / "InternVL3-1B-hf")
    assert scale.depth_of(conf, "internvl") == Depth(24, (24,))
    conf.text_config.layer_types = ["sliding_attention", "full_attention"] * 12
    assert InternVLFamily.depth(conf).uniform_text is False
    assert scale.depth_of(conf, "internvl") is None
