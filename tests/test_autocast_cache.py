"""The training forward runs bf16 autocast without its weight cache (drivekd/trainer/step.py,
TrainStep.autocast): under --gradient-checkpointing nothing else holds a layer's bf16 weight copy
after the layer ran, but autocast's cache keeps every one to the end of the forward (~0.45 GiB a
layer at InternVL3-8B's widths, 13 GiB at its 28 layers). Counted on fake tensors by the planner,
which runs the real step code."""

from pathlib import Path

import pytest
from conftest import config_copy

from drivekd.images import ImageSettings
from drivekd.planner import plan as P
from drivekd.trainer.settings import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.mark.slow
def test_checkpointed_forward_keeps_no_bf16_copy_of_each_layer(tmp_path, one_thread):
    """The micro-step's activations + temporaries grow by far less than a layer's bf16 weights per
    text layer (one camera, so the cost is the ops of 6 and 10 layers; measured with the cache on:
    0.44 GiB a layer, equal to the layer's bf16 weights; off: 0.01 GiB)."""
    counted = {}
    for n in (6, 10):
        student = config_copy(CONFIGS / "InternVL3-8B-hf", tmp_path / str(n), text=n, vision=1)
        cfg = TrainConfig(student=student, recipe="multi", projection="none", dynamic_weights=False, dtype="bfloat16",
                          gradient_checkpointing=True, image_settings=ImageSettings(tiling=False))
        config = P.student_config(student)
        family, L = P.model_depth(student)
        shapes = P.shapes_for(family, config, student, 1, None, cfg.image_settings)
        counted[n] = P.count_step(cfg, P.dry_plan(cfg, L, family), shapes, config)
    bf16_per_layer = 2 * (counted[10].params - counted[6].params) / 4
    held = {n: c.phases["micro"]["activations"] + c.phases["micro"]["temporaries"] for n, c in counted.items()}
    assert 0 <= (held[10] - held[6]) / 4 < 0.1 * bf16_per_layer, (held, bf16_per_layer)
