"""The committed demo student can see: its vision tower is the trained teacher's (graft_vision)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.demo.tiny_models import graft_vision, make_internvl

DEMO = Path(__file__).resolve().parents[1] / "drivekd" / "demo"


def test_committed_student_has_the_teachers_vision_tower():
    s = load_file(DEMO / "student" / "model.safetensors")
    t = load_file(DEMO / "teacher" / "model.safetensors")
    vision = [k for k in s if k.startswith("vision_tower.")]
    assert len(vision) > 10
    for k in vision + ["multi_modal_projector.layer_norm.weight", "multi_modal_projector.layer_norm.bias"]:
        assert torch.equal(s[k], t[k]), k
    # the language model is the student's own (narrower)
    assert s["multi_modal_projector.linear_1.weight"].shape != t["multi_modal_projector.linear_1.weight"].shape


def test_graft_copies_vision_only_and_loads(tmp_path):
    from transformers import AutoModelForImageTextToText

    make_internvl(tmp_path / "s", "student", seed=1)
    make_internvl(tmp_path / "t", "teacher", seed=2)
    before = load_file(tmp_path / "s" / "model.safetensors")
    names = graft_vision(tmp_path / "s", tmp_path / "t", tmp_path / "g")
    after, teacher = load_file(tmp_path / "g" / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    assert names and all(torch.equal(after[k], teacher[k]) for k in names)
    assert not any(torch.equal(before[k], after[k]) for k in names if k.endswith("q_proj.weight"))
    rest = [k for k in before if k not in names]
    assert all(torch.equal(before[k], after[k]) for k in rest)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "g")
    assert torch.equal(model.state_dict()["model.vision_tower.embeddings.cls_token"] if "model.vision_tower.embeddings.cls_token" in model.state_dict()
                       else model.state_dict()["vision_tower.embeddings.cls_token"], teacher["vision_tower.embeddings.cls_token"])


def test_graft_refuses_a_different_vision_config(tmp_path):
    make_internvl(tmp_path / "s", "student", seed=1)
    make_internvl(tmp_path / "t", "student", seed=2)
    t = load_file(tmp_path / "t" / "model.safetensors")
    from safetensors.torch import save_file
    t["vision_tower.embeddings.cls_token"] = torch.zeros(1, 1, 8)
    save_file(t, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(ValueError, match="vision configs must be the same"):
        graft_vision(tmp_path / "s", tmp_path / "t", tmp_path / "g")
