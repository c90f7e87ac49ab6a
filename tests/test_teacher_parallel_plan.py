"""`drivekd-cache build --dry-run --teacher-parallel tp --nproc N`: one rank's share of a sharded teacher pass."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import config_copy
from drivekd.cli.cache import main as cache_cli
from drivekd.families.base import family_class, model_config, text_tp_plan
from drivekd.images import ImageSettings
from drivekd.planner import plan as P
from drivekd.planner.teacher_parallel import count_rank

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def _expected_rank_params(ckpt: Path, n: int) -> int:
    """Parameters one rank holds under transformers' plan, from the whole model's parameter names:
    a colwise module's weight and bias and a rowwise module's weight split n ways (a rowwise bias is
    replicated), an untied lm_head (colwise) too, everything else whole (embeddings, norms, vision
    tower, projector). Tied heads are checked against a real sharded load in test_teacher_parallel."""
    config = model_config(ckpt)
    plan = {f"model.language_model.{k}": v for k, v in text_tp_plan(config).items()}
    with torch.device("meta"):
        model = family_class("internvl").model_class()._from_config(config)
    total = 0
    for name, p in model.named_parameters():
        module, kind = name.rsplit(".", 1)
        style = next((s for pat, s in plan.items() if fnmatch.fnmatch(module, pat.replace("*", "[0-9]*"))), None)
        if module == "lm_head" and not config.tie_word_embeddings:
            style = "colwise"
        split = style == "colwise" or (style == "rowwise" and kind == "weight")
        total += p.numel() // n if split else p.numel()
    return total


@pytest.mark.slow
def test_rank_holds_its_shard_and_the_whole_vision_tower(tmp_path):
    # InternVL3-1B: untied output head, 14 query / 2 kv heads; its real-size layers on fake tensors, 2 text
    # and 1 vision of them (what a rank holds is per layer; the fake-tensor trace's cost is per layer too).
    ckpt, n = config_copy(CONFIGS / "InternVL3-1B-hf", tmp_path / "InternVL3-1B-hf", text=2, vision=1), 2
    shapes = P.shapes_for("internvl", P.student_config(ckpt), ckpt, 1, 480, ImageSettings(tiling=False), "--model")  # 256 image tokens
    r = count_rank(ckpt, [0], shapes, n)
    assert r["params"] == _expected_rank_params(ckpt, n)
    whole = count_rank(ckpt, [0], shapes, 1)
    assert whole["params"] == _expected_rank_params(ckpt, 1) > r["params"]
    assert r["categories"]["weights"] == 2 * r["params"]  # bf16: only the shard is held (no view of the whole tensor)
    assert r["tracked_peak_bytes"] < whole["tracked_peak_bytes"]


@pytest.mark.slow
def test_cli_dry_run_per_rank(tiny_models):
    t = str(tiny_models / "internvl-teacher")
    args = ["build", "--teacher", "all", "--model", t, "--dry-run", "--json", "--seq-len", "600", "--teacher-parallel", "tp"]
    one = json.loads(CliRunner().invoke(cache_cli, [*args, "--nproc", "1"]).output)["teachers"][0]
    r = CliRunner().invoke(cache_cli, [*args, "--nproc", "2"])
    assert r.exit_code == 0, r.output
    two = json.loads(r.output)["teachers"][0]
    assert two["nproc"] == 2 and two["params_per_rank"] < one["params_per_rank"]
    assert two["categories"]["weights"] < one["categories"]["weights"]
    # 6 query heads cannot be split 4 ways: said before anything is counted.
    r = CliRunner().invoke(cache_cli, [*args, "--nproc", "4"])
    assert r.exit_code == 2 and "num_attention_heads = 6" in r.output and "--nproc" in r.output
