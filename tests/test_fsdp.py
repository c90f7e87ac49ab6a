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
import json, os, sys, torch
from online_targets import TEACHER_LAYERS, compute_targets
from drivekd.data.loaders import load_samples
from drivekd.trainer import checkpoint
from drivekd.trainer.loop import train
from test_fsdp import run_config
torch.set_num_threads(1)
tiny, images, data, runs = sys.argv[1:5]
targets = {}
for fam, out, extra, kill_after in json.loads(runs):
    if fam not in targets:
        targets[fam] = compute_targets(f'{tiny}/{fam}-teacher', load_samples(data, images), TEACHER_LAYERS)
    if kill_after:  # a kill -9 inside this run's kill_after-th sharded save (the hook is armed at a process's first save)
        os.environ['DRIVEKD_FAULT_KILL_AFTER'] = str(kill_after)
        checkpoint._SAVE_FAULT.clear()
    train(run_config(tiny, images, data, fam, out, **extra), targets[fam])
    print('finished', out, flush=True)
"""

# every number a metrics line carries that the ranks must reproduce (not timings or memory)
_KEYS = ("loss", "loss_ce", "loss_perception", "loss_reasoning", "loss_planning", "raw_perception", "grad_norm")


def run_config(tiny, images, data, fam: str, out, **extra) -> TrainConfig:
    """The compared run: multi + AGP + re-weighting, 2 steps of 2 micro-steps over 4 samples (so step 2
    is the second epoch: a resume from step 1 also restarts the data order), a checkpoint every step."""
    return TrainConfig(student=Path(tiny) / f"{fam}-student", data=Path(data), images=Path(images), out=Path(out), num_workers=0,
                       progress=False, grad_accum=2, max_steps=2, report_to="none", lr=1e-3, w_perception=1e3, w_reasoning=1e3,
                       device="cpu", warmup_ratio=0.0, **{"save_every": 1, "keep_last": 3, **extra})


def _launch(tmp_path, tiny_models, demo_data, data, runs) -> subprocess.CompletedProcess:
    """One torchrun launch of 2 gloo ranks running `runs` [(family, out, TrainConfig changes, kill after N saves)] in order."""
    (tmp_path / "run.py").write_text(_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    env.pop("DRIVEKD_FAULT_KILL_AFTER", None)
    runs = json.dumps([[fam, str(o), e, k] for fam, o, e, k in runs])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "run.py"),
                           str(tiny_models), str(demo_data), str(data), runs], env=env, capture_output=True, text=True, timeout=900)


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
def test_two_fsdp_ranks_equal_one_process_and_resume_exactly(tiny_models, demo_data, tmp_path):
    """Both families, 2 FSDP ranks x micro-batch 1 == 1 process x 2 (this process); (Qwen2.5-VL) also
    under --gradient-checkpointing; (InternVL) a kill -9 inside the step-2 sharded save leaves step 1
    usable, and --resume from it finishes exactly the uninterrupted run (optimizer state, schedule,
    re-weighting). Two torchrun launches in all: each rank pays its imports once (the runs, then the
    killed one last; the resume)."""
    from online_targets import TEACHER_LAYERS, compute_targets

    from drivekd.data.loaders import load_samples

    # A single view and a six-view group of three (a shared prefix). The final weights are compared at
    # 1e-5 after 2 AdamW steps, whose normalised update (m / sqrt(v)) turns reduction-order noise in a
    # near-zero gradient into a visible weight difference: measured here 3.5e-6 (InternVL) and 5e-7
    # (Qwen2.5-VL); on the first four samples one such element of 8192 reached 1.6e-5.
    data = tmp_path / "four.json"
    data.write_text(json.dumps(json.loads((demo_data / "train.json").read_text())[8:12]))
    fsdp = {"fsdp": True, "micro_batch": 1}
    full = {fam: tmp_path / f"full-{fam}" for fam in ("internvl", "qwen2_5_vl")}
    ckpt, killed = tmp_path / "checkpointing", tmp_path / "killed"
    # the gradient-checkpointed run recomputes inside the layers that the captured maps' hooks gather (no
    # step checkpoints: the full Qwen2.5-VL run before it saves them, and a sharded save costs about a step)
    runs = [("internvl", full["internvl"], fsdp, 0), ("qwen2_5_vl", full["qwen2_5_vl"], fsdp, 0),
            ("qwen2_5_vl", ckpt, {**fsdp, "gradient_checkpointing": True, "save_every": 0}, 0), ("internvl", killed, fsdp, 2)]
    p = _launch(tmp_path, tiny_models, demo_data, data, runs)
    out = p.stdout + p.stderr[-3000:]
    assert p.returncode != 0 and all(f"finished {o}" in p.stdout for _, o, _, _ in runs[:3]), out  # killed in the last run only

    for fam in ("internvl", "qwen2_5_vl"):
        one = tmp_path / f"one-{fam}"
        targets = compute_targets(tiny_models / f"{fam}-teacher", load_samples(data, demo_data), TEACHER_LAYERS)
        train(run_config(tiny_models, demo_data, data, fam, one, micro_batch=2, save_every=0), targets)  # compared: final/
        # FSDP == one process
        _close_lines(_lines(full[fam]), _lines(one), 1e-5)
        _close_weights(full[fam] / "final", one / "final", 1e-5)
        cfg = json.loads((full[fam] / "final" / "config.json").read_text())
        assert cfg["architectures"] == json.loads((one / "final" / "config.json").read_text())["architectures"]
        # Sharded step checkpoints: one DCP folder, no model files; final/ is the plain layout.
        step1 = full[fam] / "step-000001"
        assert (step1 / "sharded" / ".metadata").is_file() and len(list((step1 / "sharded").glob("*.distcp"))) == 2
        assert not (step1 / "model.safetensors").exists()
        if fam == "qwen2_5_vl":
            _close_lines(_lines(ckpt), _lines(one), 1e-5)
            _close_weights(ckpt / "final", one / "final", 1e-5)

    # kill -9 inside the second sharded save (step 2): step 1 stays complete and usable.
    assert [s for s, _ in list_checkpoints(killed)] == [1] and not (killed / "step-000002").exists()
    assert list(killed.glob(".tmp-step-000002-fsdp"))  # the interrupted save's folder, never read
    p = _launch(tmp_path, tiny_models, demo_data, data, [("internvl", killed, {**fsdp, "resume": True}, 0)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not list(killed.glob(".tmp-*")) and is_complete(killed / "step-000002")
    _close_lines(_lines(killed), _lines(full["internvl"]), 1e-6)
    _close_weights(killed / "final", full["internvl"] / "final", 1e-6)


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
