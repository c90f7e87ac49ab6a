"""--fsdp (drivekd/trainer/fsdp.py): the student sharded with FSDP2 over 2 gloo ranks under a real
torchrun equals one process (micro-batch 2 = 2 ranks x 1) within 1e-5 in losses, gradient norms,
re-weighted weights, shares and final weights; its sharded step checkpoints resume exactly, also
after a kill -9 inside a sharded save; flags it does not combine with are refused by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.errors import ConfigError, DriveKDError
from drivekd.trainer.checkpoint import is_complete, list_checkpoints
from drivekd.trainer.loop import train
from drivekd.trainer.settings import TrainConfig

_RUN = """
import json, sys, torch
from online_targets import TEACHER_LAYERS, compute_targets
from drivekd.data.loaders import load_samples
from drivekd.trainer.loop import train
from drivekd.trainer.settings import TrainConfig
torch.set_num_threads(1)
tiny, images, data, fam, runs = sys.argv[1:6]
targets = compute_targets(f'{tiny}/{fam}-teacher', load_samples(data, images), TEACHER_LAYERS)
for out, extra in json.loads(runs):
    cfg = TrainConfig(student=f'{tiny}/{fam}-student', data=data, images=images, out=out, num_workers=0, progress=False,
                      grad_accum=2, max_steps=4, report_to='none', lr=1e-3, w_perception=1e3, w_reasoning=1e3, device='cpu',
                      warmup_ratio=0.0, save_every=2, keep_last=3, **extra)
    train(cfg, targets)
"""

# every number a metrics line carries that the ranks must reproduce (not timings or memory)
_KEYS = ("loss", "loss_ce", "loss_perception", "loss_reasoning", "loss_planning", "raw_perception", "grad_norm")


def _launch(tmp_path, tiny_models, demo_data, fam, runs, nproc=None, env_extra=None):
    (tmp_path / "run.py").write_text(_RUN)
    data = tmp_path / "eight.json"
    if not data.exists():
        data.write_text(json.dumps(json.loads((demo_data / "train.json").read_text())[:8]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    runs = json.dumps([[str(o), e] for o, e in runs])
    return subprocess.run([*head, str(tmp_path / "run.py"), str(tiny_models), str(demo_data), str(data), fam, runs], env=env,
                          capture_output=True, text=True, timeout=900)


def _lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _close_lines(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in _KEYS:
            assert x[k] == pytest.approx(y[k], rel=tol, abs=tol), (x["step"], k)
        for k in ("weights", "grad_norms"):
            assert x[k] == pytest.approx(y[k], rel=tol, abs=tol), (x["step"], k)
        for k in [k for k in x if k.startswith(("share_", "along_"))]:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-9), (x["step"], k)  # ratios of small Gram entries
        assert x["projections_fired"] == y["projections_fired"]


def _close_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=tol, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("fam, kill", [("internvl", True), ("qwen2_5_vl", False)])
def test_two_fsdp_ranks_equal_one_process_and_resume_exactly(fam, kill, tiny_models, demo_data, tmp_path):
    """multi + AGP + re-weighting, 4 steps: 2 FSDP ranks x micro-batch 1 == 1 process x 2; (InternVL
    only, to keep the suite short) a kill -9 inside the step-4 sharded save leaves step 2 usable, and
    --resume from it finishes exactly the uninterrupted run (optimizer state, schedule, re-weighting)."""
    full, killed, one, ckpt = (tmp_path / n for n in ("full", "killed", "one", "checkpointing"))
    # (Qwen2.5-VL) a second run in the same launch: --gradient-checkpointing recomputes inside the
    # layers that the captured maps' hooks gather
    runs = [(full, {"fsdp": True, "micro_batch": 1})] + ([] if kill else [(ckpt, {"fsdp": True, "micro_batch": 1,
                                                                                "gradient_checkpointing": True})])
    p = _launch(tmp_path, tiny_models, demo_data, fam, runs, nproc=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = _launch(tmp_path, tiny_models, demo_data, fam, [(one, {"micro_batch": 2})])
    assert p.returncode == 0, p.stderr[-3000:]

    # FSDP == one process
    _close_lines(_lines(full), _lines(one), 1e-5)
    _close_weights(full / "final", one / "final", 1e-5)
    cfg = json.loads((full / "final" / "config.json").read_text())
    assert cfg["architectures"] == json.loads((one / "final" / "config.json").read_text())["architectures"]
    # Sharded step checkpoints: one DCP folder, no model files; final/ is the plain layout.
    step2 = full / "step-000002"
    assert (step2 / "sharded" / ".metadata").is_file() and len(list((step2 / "sharded").glob("*.distcp"))) == 2
    assert not (step2 / "model.safetensors").exists()
    if not kill:
        _close_lines(_lines(ckpt), _lines(one), 1e-5)
        _close_weights(ckpt / "final", one / "final", 1e-5)
        return

    # kill -9 inside the second sharded save (step 4): step 2 stays complete and usable.
    p = _launch(tmp_path, tiny_models, demo_data, fam, [(killed, {"fsdp": True, "micro_batch": 1})], nproc=2,
                env_extra={"DRIVEKD_FAULT_KILL_AFTER": "2"})
    assert p.returncode != 0
    assert [s for s, _ in list_checkpoints(killed)] == [2] and not (killed / "step-000004").exists()
    assert list(killed.glob(".tmp-step-000004-fsdp"))  # the interrupted save's folder, never read
    p = _launch(tmp_path, tiny_models, demo_data, fam, [(killed, {"fsdp": True, "micro_batch": 1, "resume": True})], nproc=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not list(killed.glob(".tmp-*")) and is_complete(killed / "step-000004")
    _close_lines(_lines(killed), _lines(full), 1e-6)
    _close_weights(killed / "final", full / "final", 1e-6)


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


def test_planner_gives_each_rank_its_shards_plus_the_gathered_units(tiny_models):
    """--dry-run --fsdp --nproc N: weights, gradients, rows and optimizer state per rank are 1/N of
    one process's (plus the gathered units during the backwards); more ranks, a lower peak."""
    from drivekd.planner import dry_run

    cfg = TrainConfig(student=tiny_models / "internvl-student", recipe="multi", fsdp=True)
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
