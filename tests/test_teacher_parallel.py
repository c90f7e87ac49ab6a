"""Teachers larger than one device (issue 27): `drivekd-cache build --teacher-parallel tp` under real
torchrun (gloo, CPU) writes the store a single process writes, for both families, composed with data
parallelism (dp x tp); `--device-map auto` passes through to from_pretrained; bad flag
combinations stop before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from drivekd.cli.cache import main as cache_cli
from drivekd.store.zarr_store import TeacherStore
from drivekd.teacher.build import BuildConfig, build

from test_cache import _files


def _toml(tiny_models: Path, d: Path) -> Path:
    """A project config naming one checkpoint per family: InternVL for perception and planning,
    Qwen2.5-VL for reasoning (two teacher passes in one build)."""
    p = d / "drivekd.toml"
    text = (f'[teachers]\nperception = "{tiny_models / "internvl-teacher"}"\nplanning = "{tiny_models / "internvl-teacher"}"\n'
            f'reasoning = "{tiny_models / "qwen2_5_vl-teacher"}"\n')
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def single(tiny_models, small_data, tmp_path_factory):
    """The single-process store of both families, with logits and hidden states."""
    d = tmp_path_factory.mktemp("tp-single")
    out = d / "cache"
    r = CliRunner().invoke(cache_cli, ["build", "--teacher", "all", "--config", str(_toml(tiny_models, d)), "--signals", "logits,hidden",
                                       "--data", str(small_data), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def _assert_same_store(a: Path, b: Path, signals: bool) -> None:
    """Same samples, token layouts and shapes; values equal within fp32 reduction noise, which the fp16
    store turns into at most one fp16 rounding step (relative 2^-11) on a map entry."""
    sa, sb = TeacherStore(a), TeacherStore(b)
    assert sa.roles() == sb.roles()
    assert sorted(_files(a)) == sorted(_files(b))  # the same arrays, prefixes and marks, nothing more or less
    n = 0
    for r in sa.roles():
        ids = sa.role_meta(r)["sample_ids"]
        assert ids == sb.role_meta(r)["sample_ids"]
        want = {"logits": None, "hidden": list(sa.role_info(r).layers)} if signals else None
        for sid in ids:
            assert sa.sample_status(r, sid) == sb.sample_status(r, sid) == "complete"
            ta, tb = sa.get(r, sid, signals=want), sb.get(r, sid, signals=want)
            assert ta.fingerprint == tb.fingerprint
            assert torch.equal(ta.vision, tb.vision) and torch.equal(ta.text, tb.text)
            assert ta.maps.keys() == tb.maps.keys()
            for l in ta.maps:
                torch.testing.assert_close(tb.maps[l], ta.maps[l], rtol=1e-3, atol=1e-6)
                n += 1
            if signals:
                assert torch.equal(ta.logits.positions, tb.logits.positions)
                torch.testing.assert_close(tb.logits.logprobs, ta.logits.logprobs, rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(tb.logits.log_tail, ta.logits.log_tail, rtol=1e-3, atol=1e-4)
                for l, h in ta.hidden.layers.items():
                    torch.testing.assert_close(tb.hidden.layers[l], h, rtol=2e-3, atol=1e-4)
    assert n > 0


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "drivekd.cli.cache", "build", *args, "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)


@pytest.mark.slow
def test_dp_x_tp_build_equals_single_process(tiny_models, small_data, single, tmp_path):
    """4 ranks = 2 teacher replicas x 2-way tensor parallelism, each teacher sharded over its replica's
    2 ranks: InternVL (6 heads, 2 kv) and Qwen2.5-VL, shared prefixes and single views, attention with
    logits and hidden states. Each replica writes its share of the units (the 2-view group and 3 single
    views: both replicas have work). One launch: tp alone (1 replica) is this with dp = 1, the same
    mesh and load code, and each rank's interpreter start-up is most of a launch's cost."""
    out = tmp_path / "cache"
    # --store-signals: torchrun's own parser refuses --signals (an abbreviation of its --signals-to-handle)
    p = _torchrun(4, ["--teacher", "all", "--config", str(_toml(tiny_models, tmp_path)), "--store-signals", "logits,hidden", "--data", str(small_data),
                      "--out", str(out), "--teacher-parallel", "tp", "--tp-size", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "MISSING" not in p.stderr  # every weight loaded into its shard (no silently random layer)
    # Counted once per teacher pass (summed over the replicas), not once per rank of a replica.
    assert "10 samples written" in p.stdout, p.stdout
    _assert_same_store(single, out, signals=True)
    # The planner's per-rank parameters are what transformers' sharded load holds on a rank
    # (tied output head and embeddings split, vision tower whole), for both families.
    from drivekd.planner import plan as P
    from drivekd.planner.teacher_parallel import count_rank

    for name in ("internvl-teacher", "qwen2_5_vl-teacher"):
        ckpt = tiny_models / name
        family, _ = P.model_depth(ckpt, "--model")
        shapes = P.shapes_for(family, P.student_config(ckpt), ckpt, 1, 1200, None, "--model")
        held = count_rank(ckpt, [0], shapes, 2, torch.float32)["params"]
        assert f"teacher {name} sharded over 2 ranks (2 replica(s)): {held} parameters on each rank" in p.stdout, p.stdout
    # Without the all-reduce each rank would hold the mean of its own 3 heads: far outside fp16 rounding.
    assert TeacherStore(out).summary("perception")["complete"] == 5


REFUSALS = [
    ({}, ["--teacher-parallel", "tp"], "launch it under torchrun"),
    ({}, ["--tp-size", "2"], "--tp-size 2 needs --teacher-parallel tp"),
    ({"WORLD_SIZE": "2"}, ["--teacher-parallel", "tp", "--device-map", "auto"], "pass one of them"),
    ({"WORLD_SIZE": "3"}, ["--teacher-parallel", "tp", "--tp-size", "2"], "must divide the torchrun world size 3"),
    # 6 query heads, 2 kv heads: 4 ranks cannot share them evenly (named, from config.json).
    ({"WORLD_SIZE": "4"}, ["--teacher-parallel", "tp"], "num_attention_heads = 6"),
    ({"WORLD_SIZE": "2"}, ["--device-map", "auto"], "under torchrun (2 ranks)"),
    ({}, ["--nproc", "2"], "--nproc plans a tensor-parallel teacher"),
    ({}, ["--device-map", "auto", "--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
]


@pytest.mark.parametrize("env,flags,message", REFUSALS, ids=[m.split()[0] + str(i) for i, (_, _, m) in enumerate(REFUSALS)])
def test_flags_refused_before_any_model_loads(tiny_models, small_data, tmp_path, monkeypatch, env, flags, message):
    import drivekd.teacher.build as B

    def boom(*a, **k):
        raise AssertionError("reached past flag validation")

    monkeypatch.setattr(B, "load_teacher", boom)
    monkeypatch.setattr(B, "Dist", boom)  # not even the process group starts
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(cache_cli, ["build", "--teacher", "perception", "--model", str(tiny_models / "internvl-teacher"),
                                       "--data", str(small_data), "--out", str(tmp_path / "c"), "--no-progress", *flags])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_device_map_auto_passes_through(tiny_models, small_data, tmp_path, monkeypatch):
    """On CPU all a device map can show: accepted, handed to from_pretrained as device_map, and the
    store identical to the plain build's."""
    import drivekd.teacher.parallel as P

    seen = []
    real = P.load_model

    def spy(*a, **k):
        model = real(*a, **k)
        seen.append(k.get("placement"))
        return model

    monkeypatch.setattr(P, "load_model", spy)

    def cfg(out, **kw):
        return BuildConfig(teachers={"perception": tiny_models / "internvl-teacher"}, data=small_data, images=None, out=out, progress=False, **kw)

    build(cfg(tmp_path / "plain"))
    build(cfg(tmp_path / "mapped", device_map="auto"))
    assert seen == [None, {"device_map": "auto"}]  # load_model hands it to from_pretrained and leaves the model where it is placed
    assert _files(tmp_path / "plain") == _files(tmp_path / "mapped")
