"""--fsdp (drivekd/trainer/fsdp.py): flags it does not combine with are refused by name, and the
planner's per-rank shares. Its 2-rank runs (equal to one process within 1e-5, sharded checkpoints
resumed exactly, also after a kill -9 inside a sharded save) are in tests/test_two_ranks.py, on the
suite's one torchrun launch."""

import pytest

from drivekd.errors import ConfigError, DriveKDError
from drivekd.trainer.loop import train
from drivekd.trainer.settings import TrainConfig


@pytest.mark.parametrize("extra, flag", [({"lora": True}, "--lora"), ({"grad_engine": "gram"}, "--grad-engine gram"),
                                         ({"precision": "bf16-stochastic"}, "--precision"),
                                         ({"calibrate_kd": 0.1}, "--calibrate-kd"), ({"recipe": "hidden"}, "--recipe hidden"),
                                         ({"eval_every": 2}, "validation during training")])
def test_settings_fsdp_does_not_combine_with_are_refused_by_name(extra, flag, tmp_path):
    with pytest.raises(ConfigError, match=f"--fsdp: {flag}"):
        TrainConfig(student=tmp_path, out=tmp_path / "o", fsdp=True, **extra)


def test_fsdp_outside_torchrun_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = TrainConfig(student=tmp_path / "no-such-student", data=tmp_path / "no.json", out=tmp_path / "o", fsdp=True)
    with pytest.raises(DriveKDError, match="--fsdp shards the student over the processes of a torchrun launch"):
        train(cfg)


@pytest.mark.slow
def test_planner_gives_each_rank_its_shards_plus_the_gathered_units(tiny_models, tmp_path):
    """--dry-run --fsdp --nproc N: weights, gradients, rows and optimizer state per rank are 1/N of
    one process's (plus the gathered units during the backwards); more ranks, a lower peak. (The tiny
    student at 2 text and 1 vision layers: the split is per unit, and the fake-tensor trace's cost
    is per layer.)"""
    from conftest import config_copy

    from drivekd.planner import dry_run

    student = config_copy(tiny_models / "internvl-student", tmp_path / "shallow", text=2, vision=1)
    cfg = TrainConfig(student=student, recipe="multi", fsdp=True)
    one, two = (dry_run(cfg, cameras=1, nproc=n) for n in (1, 2))
    assert two["nproc"] == 2 and two["units"]["weights"] > two["units"]["root"] > 0
    micro = two["phases"]["micro"]
    # the backward phase per rank: the counted rows / optimizer state halved, the root + 2 blocks gathered
    from drivekd.planner.sharded import per_rank

    got = per_rank(micro, 2, two["units"])
    assert got["grad_rows"] == micro["grad_rows"] // 2 and got["optimizer_state"] == micro["optimizer_state"] // 2
    units = two["units"]
    assert got["weights"] == micro["weights"] // 2 + units["root"] + 2 * units["largest_block"]
    assert two["peak_bytes"] < one["peak_bytes"]
    assert two["categories"]["grad_rows"] * 2 <= one["categories"]["grad_rows"] + 1


def test_planner_nproc_without_fsdp_is_refused(tiny_models):
    from drivekd.planner import dry_run

    with pytest.raises(ConfigError, match="--nproc 2 plans a sharded student: add --fsdp"):
        dry_run(TrainConfig(student=tiny_models / "internvl-student"), nproc=2)
