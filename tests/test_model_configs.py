"""The shipped real-model configs (configs/models/) build the published architectures.

Each folder is built with `from_config` on the meta device (no memory, well under a second) and its
parameter count is checked against the published model size; drivekd's family detection must accept
it. The counts pin the tied/untied output head too: Qwen2.5-VL-3B ties it (a tied-head mistake on
InternVL3-1B would count 0.80 B instead of 0.94 B).
"""

import json
from pathlib import Path

import pytest
import torch

from drivekd.families.base import detect_family, family_class

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"

# folder: (family, published size in parameters, tied output head, decoder layers)
PUBLISHED = {
    "InternVL3-1B-hf": ("internvl", 0.938e9, False, 24),
    "InternVL3-2B-hf": ("internvl", 2.09e9, False, 28),
    "InternVL3-8B-hf": ("internvl", 7.94e9, False, 28),
    # The 14B / 38B-class teachers (issue 27's per-rank teacher planner).
    "InternVL3-14B-hf": ("internvl", 15.1e9, False, 48),
    "InternVL3-38B-hf": ("internvl", 38.4e9, False, 64),
    "Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", 3.75e9, True, 36),
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", 8.29e9, False, 28),
}


def _unique_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def test_every_shipped_folder_is_listed():
    assert sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_builds_the_published_model(name):
    from transformers import AutoConfig

    family, size, tied, layers = PUBLISHED[name]
    folder = CONFIGS / name
    assert detect_family(folder) == family
    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = family_class(family).model_class()._from_config(cfg)
    model.tie_weights()
    n = _unique_params(model)
    assert abs(n - size) / size < 0.005, f"{name}: {n / 1e9:.4f} B parameters, published {size / 1e9} B"
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert cfg.get_text_config().num_hidden_layers == layers


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_image_token_settings(name):
    """The processor files give the published per-tile / per-patch token arithmetic."""
    folder = CONFIGS / name
    cfg = json.loads((folder / "config.json").read_text())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    if PUBLISHED[name][0] == "internvl":
        vc = cfg["vision_config"]
        per_side = vc["image_size"][0] // vc["patch_size"][0]  # 448 / 14 = 32
        tokens = int(per_side**2 * cfg["downsample_ratio"] ** 2)
        assert tokens == 256 == cfg["image_seq_length"]
        assert json.loads((folder / "processor_config.json").read_text())["image_seq_length"] == 256
        assert pre["size"] == {"height": 448, "width": 448} and pre["max_patches"] == 12
    else:
        assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)
        assert pre["patch_size"] == cfg["vision_config"]["patch_size"] == 14
        assert pre["merge_size"] == cfg["vision_config"]["spatial_merge_size"] == 2
