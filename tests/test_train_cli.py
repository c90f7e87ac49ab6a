"""drivekd-train end to end on a real teacher store: flags and config, validation errors that name
the flag, kill -9 and resume, and two data-parallel ranks equal to one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from drivekd.cli.train import main as train_cli
from drivekd.trainer.checkpoint import list_checkpoints

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data6(demo_data, tmp_path_factory):
    """Six samples (two of each capability, one- and six-view)."""
    records = json.loads((demo_data / "train.json").read_text())[:6]
    p = tmp_path_factory.mktemp("data6") / "train.json"
    p.write_text(json.dumps(records))
    return p


@pytest.fixture(scope="module")
def store(tiny_models, data6, demo_data, tmp_path_factory):
    from drivekd.teacher.build import BuildConfig, build

    t = tiny_models / "internvl-teacher"
    out = tmp_path_factory.mktemp("store") / "cache"
    build(BuildConfig(teachers={"perception": t, "reasoning": t, "planning": t}, data=data6, images=demo_data, out=out, progress=False))
    return out


def _args(tiny_models, data6, demo_data, store, out, *extra):
    return ["--cache", str(store), "--student", str(tiny_models / "internvl-student"), "--data", str(data6), "--images", str(demo_data),
            "--out", str(out), "--num-workers", "0", "--no-progress", *extra]


def _run(args):
    r = CliRunner().invoke(train_cli, args)
    return r


def _losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_from_store_and_config_is_overridden(tiny_models, data6, demo_data, store, tmp_path):
    toml = tmp_path / "drivekd.toml"
    toml.write_text('[train]\nlr = 1e-3\nmax_steps = 2\ngrad_accum = 1\nrecipe = "multi"\nsave_every = 0\nwarmup_ratio = 0.0\n')
    out = tmp_path / "run"
    r = _run(_args(tiny_models, data6, demo_data, store, out, "--config", str(toml), "--lr", "2e-3", "--projection", "g2"))
    assert r.exit_code == 0, r.output
    assert "2 steps" in r.output
    cfg = json.loads((out / "final" / "trainer_state.json").read_text())["config"]
    assert cfg["lr"] == 2e-3 and cfg["max_steps"] == 2 and cfg["projection"] == "g2" and cfg["grad_accum"] == 1
    assert len(_losses(out)) == 2
    # --no-progress: one plain line per logged step (a log file reads these, not a bar)
    assert [l.split(" loss ")[0] for l in r.output.splitlines() if l.startswith("drivekd-train: step ")] == \
        ["drivekd-train: step 1/2", "drivekd-train: step 2/2"]


BAD = [
    (["--mix", "1,0;0,1"], "--mix must be 3x3"),
    (["--mix", "1,0,0;0,1,0;0,0,-1"], "--mix entries must be finite and >= 0"),
    (["--w-planning", "-1"], "--w-planning must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--grad-accum", "0"], "--grad-accum must be > 0"),
    (["--recipe", "perception", "--layers", "7"], "--layers.*out of range for a model with 4 decoder layers"),
    (["--recipe", "perception", "--layers", "1"], "--layers: the perception term needs teacher layers \\[1\\].*store has only \\[0\\]"),
    (["--layers", "0"], "--layers.*per role"),
    (["--mid-range", "mid9"], "--mid-range"),
    (["--recipe", "planning", "--mid-range", "mid2"], "--mid-range applies to the reasoning term"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in"),
    (["--resume", "--resume-from", "x"], "--resume"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_validation_errors_name_the_flag(tiny_models, data6, demo_data, store, tmp_path, monkeypatch, extra, message):
    import re

    import drivekd.trainer.loop as loop

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(loop, "load_model", no_model)
    r = _run(_args(tiny_models, data6, demo_data, store, tmp_path / "run", *extra))
    assert r.exit_code == 2, r.output
    assert re.search(message, r.output), r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output


def test_validation_errors_of_store_and_files(tiny_models, data6, demo_data, store, tmp_path, monkeypatch):
    from drivekd.teacher.build import BuildConfig, build

    t = tiny_models / "internvl-teacher"
    partial = tmp_path / "partial"
    build(BuildConfig(teachers={"perception": t}, data=data6, images=demo_data, out=partial, progress=False))
    r = _run(_args(tiny_models, data6, demo_data, partial, tmp_path / "run"))
    assert r.exit_code == 2 and "--recipe multi needs the reasoning, planning teacher role(s)" in r.output, r.output
    # A run folder that already holds a run needs --resume.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "metrics.jsonl").write_text("")
    r = _run(_args(tiny_models, data6, demo_data, store, tmp_path / "busy"))
    assert r.exit_code == 2 and "--out" in r.output and "--resume" in r.output, r.output
    # Unknown keys in the config file are named.
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nlearning_rate = 1e-3\n")
    r = _run(_args(tiny_models, data6, demo_data, store, tmp_path / "run2", "--config", str(toml)))
    assert r.exit_code == 2 and "learning_rate" in r.output, r.output
    # A student of another family than the store's teacher.
    r = _run(_args(tiny_models, data6, demo_data, store, tmp_path / "run3") + ["--student", str(tiny_models / "qwen2_5_vl-student")])
    assert r.exit_code == 2 and "internvl" in r.output and "qwen2_5_vl" in r.output, r.output


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tiny_models, data6, demo_data, store, tmp_path):
    # 4 steps of one sample over three samples: killed after step 1's checkpoint, the resumed run
    # crosses into the second epoch (step 4), so the epoch's data order is restored too. Three steps
    # after the kill point leave the killed process no chance to finish before the kill lands.
    data3 = tmp_path / "train3.json"
    data3.write_text(json.dumps(json.loads(data6.read_text())[:3]))
    common = ["--max-steps", "4", "--save-every", "1", "--grad-accum", "1", "--lr", "1e-3", "--keep-last", "2"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "drivekd.cli.train", *_args(tiny_models, data3, demo_data, store, killed, *common)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not (killed / "step-000001" / "COMPLETE").exists():  # no deadline: a loaded machine may be slow
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stdout.close()  # else its pipe is left to the garbage collector (a ResourceWarning, an error here)
    r = _run(_args(tiny_models, data3, demo_data, store, killed, *common, "--resume"))
    assert r.exit_code == 0, r.output
    clean = tmp_path / "clean"
    r = _run(_args(tiny_models, data3, demo_data, store, clean, *common))
    assert r.exit_code == 0, r.output
    assert [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(1, 5))
    assert _losses(killed) == pytest.approx(_losses(clean), rel=1e-6)
    a, b = load_file(str(killed / "final" / "model.safetensors")), load_file(str(clean / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert not list(killed.glob(".tmp-*"))
    assert [s for s, _ in list_checkpoints(killed)] == [3, 4]  # --keep-last 2


