"""drivekd-train's run banner (and the same facts in run.json), and a resume that extends a run:
a larger --max-steps continues with the cosine re-stretched (drivekd/trainer/schedule.py), other
changed settings and a shorter run stay refused."""

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from drivekd.cli.train import main as train_cli

pytestmark = pytest.mark.usefixtures("one_thread")

LR, FLOOR = 1e-3, 0.1


@pytest.fixture(scope="module")
def data2(demo_data, tmp_path_factory):
    """The one-view perception samples (the ones --recipe perception trains on, the cheapest)."""
    records = [r for r in json.loads((demo_data / "train.json").read_text())
               if r["question_type"] == "perception" and len(r["images"]) == 1]
    assert len(records) == 2
    p = tmp_path_factory.mktemp("data2") / "train.json"
    p.write_text(json.dumps(records))
    return p


@pytest.fixture(scope="module")
def store1(tiny_models, data2, demo_data, tmp_path_factory):
    """A perception-only store: the cheapest one a teacher term trains from."""
    from drivekd.teacher.build import BuildConfig, build

    out = tmp_path_factory.mktemp("store1") / "cache"
    build(BuildConfig(teachers={"perception": tiny_models / "internvl-teacher"}, data=data2, images=demo_data, out=out, progress=False))
    return out


def _args(tiny_models, data2, demo_data, store1, out, *extra):
    return ["--cache", str(store1), "--student", str(tiny_models / "internvl-student"), "--data", str(data2), "--images",
            str(demo_data), "--out", str(out), "--num-workers", "0", "--no-progress", "--recipe", "perception", "--micro-batch", "1",
            "--grad-accum", "1", "--lr", str(LR), "--min-lr-ratio", str(FLOOR), "--warmup-ratio", "0", *extra]


def _run(args):
    return CliRunner().invoke(train_cli, args)


def _lrs(run) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_banner_on_the_terminal_and_its_facts_in_run_json(tiny_models, data2, demo_data, store1, tmp_path):
    out = tmp_path / "run"
    r = _run(_args(tiny_models, data2, demo_data, store1, out, "--max-steps", "2", "--save-every", "0"))
    assert r.exit_code == 0, r.output
    facts = json.loads((out / "run.json").read_text())["run"]
    assert facts["samples"] == 2 and facts["optimizer_steps"] == 2 and facts["micro_steps"] == 2
    assert 0 < facts["trainable_params"] <= facts["params"]
    # the engine --grad-engine auto chose, not "auto": on a CPU the rows, and why
    assert facts["grad_engine"] == "rows" and facts["grad_engine_reason"].startswith("auto: rows")
    assert facts["precision"] == "fp32" and facts["autocast"] == "float32"
    assert facts["tokens"]["samples_read"] == 2 and 0 < facts["tokens"]["min"] <= facts["tokens"]["max"]
    [term] = facts["terms"]
    assert term["role"] == "perception" and term["pairs"]
    # the banner: the same facts, on the terminal (stderr), before the closing line
    assert "***** drivekd-train *****" in r.output
    for text in ("samples: 2", "optimizer steps: 2", "micro-steps: 2", f"trainable parameters: {facts['trainable_params']:,}",
                 "gradient engine: rows (auto: rows", f"tokens per sample (T): {facts['tokens']['min']}-{facts['tokens']['max']}",
                 "perception: "):
        assert text in r.output, r.output
    # a CPU run: no count at start (it would cost seconds; the planner counts GPU memory), and why
    assert facts["planned_memory"]["planned"] is False and facts["planned_memory"]["why"].startswith("--device cpu")
    assert "planned peak memory: not planned (--device cpu: the planner counts GPU memory" in r.output
    assert r.output.index("*****") < r.output.index("drivekd-train: 2 steps")


@pytest.mark.slow  # two fake-tensor counts of the tiny student (~7 CPU s)
def test_planned_peak_is_the_dry_runs_count_at_the_runs_shapes(tiny_models, data2, demo_data, store1, tmp_path, monkeypatch):
    """On a CUDA run the banner's planned peak is `drivekd-train --dry-run`'s count for this run: the
    store's longest T (at least what the synthetic sample needs), the data's cameras, the device's
    memory. (The CUDA device is faked here: the count itself runs on fake tensors on the CPU.)"""
    import torch

    from drivekd.planner import dry_run, run_peak
    from drivekd.trainer.loop import _token_range
    from drivekd.trainer.plan import validate
    from drivekd.trainer.settings import TrainConfig

    cfg = TrainConfig(cache=store1, student=tiny_models / "internvl-student", data=data2, images=demo_data, out=tmp_path / "run",
                      recipe="perception", num_workers=0, progress=False)
    plan = validate(cfg)
    tokens = _token_range(plan)
    gpu = 24 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("Props", (), {"total_memory": gpu})())
    got = run_peak.planned_memory(plan, tokens, torch.device("cuda", 0), world=1)
    assert got["planned"] is True and got["cameras"] == 1 and got["gpu_memory_bytes"] == gpu and got["fits"] is True
    assert got["seq_len"] >= tokens["max"]  # the longest sample, or the synthetic sample's minimum when longer
    want = dry_run(cfg, seq_len=got["seq_len"], cameras=1, gpu_memory=gpu, suggest=False)
    assert (got["peak_bytes"], got["tracked_peak_bytes"], got["grad_engine"]) == (want["peak_bytes"], want["tracked_peak_bytes"],
                                                                                 want["grad_engine"])
    line = run_peak.describe(got)
    assert line.startswith(f"{want['peak_bytes'] / (1 << 30):.2f} GiB of 24.00 GiB (fits; T {got['seq_len']}, 1 camera(s)"), line


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_run_plans_its_peak_and_stays_under_it(tiny_models, data2, demo_data, store1, tmp_path):
    """A real CUDA run: the banner and run.json carry the planner's peak, and the step's measured peak
    (metrics' peak_mem_bytes, CUDA's max_memory_allocated) stays under it."""
    out = tmp_path / "run"
    r = _run(_args(tiny_models, data2, demo_data, store1, out, "--max-steps", "2", "--save-every", "0", "--device", "cuda"))
    assert r.exit_code == 0, r.output
    planned = json.loads((out / "run.json").read_text())["run"]["planned_memory"]
    assert planned["planned"] is True and planned["fits"] is True, planned
    assert "planned peak memory: " in r.output and " GiB of " in r.output
    measured = max(m["peak_mem_bytes"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    assert 0 < measured <= planned["peak_bytes"], (measured, planned)


def test_planned_peak_says_why_not(tiny_models):
    """Where the planner's count would not be this run's (or costs a CPU run's start), the record says why."""
    import torch

    from drivekd.planner.run_peak import why_not
    from drivekd.trainer.settings import TrainConfig

    cuda = torch.device("cuda", 0)
    cfg = TrainConfig(student=tiny_models / "internvl-student")
    assert why_not(cfg, cuda, 1) is None
    assert why_not(TrainConfig(student=cfg.student, plan_memory=False), cuda, 1) == "--no-plan-memory"
    assert why_not(cfg, torch.device("cpu"), 1).startswith("--device cpu: the planner counts GPU memory")
    assert why_not(cfg, cuda, 2).startswith("2 processes: the planner counts one process")
    assert why_not(TrainConfig(student=cfg.student, micro_batch=2), cuda, 1).startswith("--micro-batch 2: the planner counts one sample")
    assert why_not(TrainConfig(student=cfg.student, recipe="kl"), cuda, 1).startswith("--recipe kl: the planner counts the attention terms only")


def _cosine(step: int, start: int, end: int, f0: float) -> float:
    """The lr of the step after `step` steps: a half cosine from f0 x LR at `start` to FLOOR x LR at `end`."""
    return LR * (FLOOR + (f0 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (step - start) / (end - start))))


@pytest.mark.slow
def test_resume_with_more_steps_extends_the_run(tiny_models, data2, demo_data, store1, tmp_path):
    def args(run, *extra):
        return _args(tiny_models, data2, demo_data, store1, run, "--save-every", "2", "--keep-last", "3", *extra)

    out = tmp_path / "run"
    base = args(out)
    r = _run([*base, "--max-steps", "6"])
    assert r.exit_code == 0, r.output
    first = _lrs(out)
    # the fresh schedule: cosine from LR (no warmup) to the floor at step 6; step k runs at the factor of k - 1
    assert [first[k] for k in range(1, 7)] == pytest.approx([_cosine(k - 1, 0, 6, 1.0) for k in range(1, 7)], rel=1e-9)
    mid, by_epochs = tmp_path / "mid", tmp_path / "epochs"
    shutil.copytree(out, mid)
    shutil.copytree(out, by_epochs)

    # A shorter run and any other changed setting stay refused.
    r = _run([*base, "--max-steps", "4", "--resume"])
    assert r.exit_code == 2 and "not shorten" in r.output and "--max-steps 6" in r.output, r.output
    r = _run([*base, "--max-steps", "8", "--resume", "--lr", "2e-3"])
    assert r.exit_code == 2 and "settings differ" in r.output and "--lr" in r.output, r.output

    # From its end (step 6, lr at the floor): steps 7-8 continue at the floor.
    r = _run([*base, "--max-steps", "8", "--resume"])
    assert r.exit_code == 0, r.output
    lrs = _lrs(out)
    assert sorted(lrs) == list(range(1, 9))
    assert [lrs[k] for k in range(1, 7)] == [first[k] for k in range(1, 7)]
    assert [lrs[7], lrs[8]] == pytest.approx([FLOOR * LR, FLOOR * LR], rel=1e-9)
    record = json.loads((out / "run.json").read_text())
    last = record["history"][-1]
    assert last["from_step"] == 6 and last["extended"]["from_steps"] == 6 and last["extended"]["to_steps"] == 8
    assert "re-stretched" in last["extended"]["rule"] and record["history"][0]["extended"] is None
    assert last["run"]["schedule"] == {"warmup": 0, "end": 8, "floor": FLOOR, "start": 6, "start_factor": pytest.approx(FLOOR)}
    assert "extended: 6 -> 8 steps" in r.output

    # From mid-run (step 4): the cosine re-stretched from step 4's lr to the floor at step 8.
    r = _run([*args(mid), "--max-steps", "8", "--resume-from", str(mid / "step-000004")])
    assert r.exit_code == 0, r.output
    lrs = _lrs(mid)
    assert [lrs[k] for k in range(1, 5)] == [first[k] for k in range(1, 5)]
    f4 = _cosine(4, 0, 6, 1.0) / LR
    assert [lrs[k] for k in range(5, 9)] == pytest.approx([_cosine(k - 1, 4, 8, f4) for k in range(5, 9)], rel=1e-9)
    # and a second resume of the extended run keeps its stretched schedule (recorded in the checkpoint)
    r = _run([*args(mid), "--max-steps", "8", "--resume-from", str(mid / "step-000006")])
    assert r.exit_code == 0, r.output
    assert [_lrs(mid)[k] for k in (7, 8)] == [lrs[7], lrs[8]]

    # --epochs extends too: 5 passes over the 2 samples (micro-batch 1) are 10 steps, 7-10 at the floor.
    r = _run([*args(by_epochs), "--epochs", "5", "--resume"])
    assert r.exit_code == 0, r.output
    lrs = _lrs(by_epochs)
    assert sorted(lrs) == list(range(1, 11)) and [lrs[k] for k in range(7, 11)] == pytest.approx([FLOOR * LR] * 4, rel=1e-9)
