"""Every 2-rank check of the suite, on 2 gloo ranks of one real torchrun launch, each equal to the
same work in one process (here):

- drivekd-cache build shards the samples (5: uneven) and writes the single process's store, byte
  for byte;
- drivekd-analyze shards its pre-studies and equals one process's analysis;
- drivekd-train (2 ranks x micro-batch 1 == 1 process x 2): the per-loss rows are averaged across
  ranks before AGP; validation splits its samples and generated questions and all-reduces them;
- the measured shares and the calibration (--calibrate-kd) are of the rank-averaged gradients;
- the Gram engine all-reduces its blocks, cross-rank terms included;
- --fsdp (both families, also with --gradient-checkpointing) within 1e-5; a kill -9 inside a sharded
  save leaves the previous step usable and --resume finishes the uninterrupted run exactly;
- each rank tears its process group down at exit (a group left to the C++ destructors can abort a
  rank that finished its work, "terminate called without an active exception", and torchrun then
  fails the launch).

Why one launch: a launch costs each rank the imports of torch, transformers and drivekd (about 14 CPU s
for the launcher and 2 ranks), more than most of these checks. So the ranks run every job in order
(tests/rank_jobs.py: the console scripts' own click commands and train(), as users run them), the
FSDP kill -9 last since it ends the launch; a second launch resumes the killed run and checks the
teardown at exit. A job that fails stops the launch: its test shows the traceback, the tests of the
jobs after it say that they did not run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from rank_jobs import contribution_config, fsdp_config
from test_analyze import TAUS, analysed, rw_data  # noqa: F401 - fixtures: the one-process analysis
from test_cache import _files, built  # noqa: F401 - fixture: the one-process store of small_data
from test_contribution import ROWS
from test_gram_engine import batch_of, forward, make_trainer, rel, unit_weights
from test_train_cli import _args, data6, store  # noqa: F401 - fixtures: six samples and their store

from drivekd.cli.train import main as train_cli
from drivekd.trainer.checkpoint import is_complete, list_checkpoints
from drivekd.trainer.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

HERE = Path(__file__).parent
FSDP = {"fsdp": True, "micro_batch": 1}
FAMILIES = ("internvl", "qwen2_5_vl")


# every number a metrics line carries that the ranks must reproduce (not timings or memory)
_KEYS = ("loss", "loss_ce", "loss_perception", "loss_reasoning", "loss_planning", "raw_perception", "grad_norm")


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


def _launch(tmp_path: Path, name: str, jobs: list[dict]) -> subprocess.CompletedProcess:
    """One torchrun launch of 2 gloo ranks running `jobs` in order (tests/rank_jobs.py)."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    env.pop("DRIVEKD_FAULT_KILL_AFTER", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "rank_jobs.py"), str(spec)], env=env, capture_output=True, text=True, timeout=900)


def _ran(p: subprocess.CompletedProcess, job: str) -> None:
    """Both ranks finished `job`; else the launch's output, which names the job that failed."""
    done = [f"rank {r} done {job}" in p.stdout for r in (0, 1)]
    assert all(done), f"job {job!r} did not finish on both ranks (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def _records(demo_data: Path, tmp_path: Path, name: str, part: slice) -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(json.loads((demo_data / "train.json").read_text())[part]))
    return p


@pytest.fixture(scope="module")
def gram_one(tiny_models, demo_data, targets):
    """The Gram engine's reference in one process: the global batch [0, 5], per-row weights making every
    row's gradient norm 1 (the scales the ranks apply too), AGP over the row buffers."""
    from drivekd.projection import GradBuffers, combine

    tr = make_trainer(tiny_models, demo_data, targets, "internvl")
    with forward(tr, batch_of(tr, [0, 5])) as losses:
        weighted = unit_weights(tr.params, losses)
        scales = [float(w.detach() / l.detach()) for w, l in zip(weighted, losses)]
        bufs = GradBuffers(tr.params, 4)
        for r in range(4):
            bufs.backward(r, weighted[r], retain_graph=r < 3)
    grad, info = combine(bufs.buffer, "agp", [2, 3, 1], return_info=True)
    return {"scales": scales, "grad": grad, "gram": info["gram"], "blocks": len(tr.params)}


@pytest.fixture(scope="module")
def launched(tiny_models, demo_data, small_data, data6, store, rw_data, gram_one, tmp_path_factory):  # noqa: F811
    """The first launch: every job, the FSDP kill last. Returns (process, folder)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    tiny, images = str(tiny_models), str(demo_data)
    # drivekd-train validates on the demo questions, the multiple-choice ones tagged 0 as DriveBench tags them
    bench = json.loads((demo_data / "drivebench.json").read_text())
    recs = json.loads((demo_data / "train.json").read_text())
    (tmp / "eval.json").write_text(json.dumps([dict(t, tag=[0]) if b["tag"] == [0] else t for t, b in zip(recs, bench)]))
    contribution_data = _records(demo_data, tmp, "contribution", slice(0, 4))  # 2 steps of 4: two epochs
    # FSDP: a single view and a six-view group of three (a shared prefix); see test_fsdp_equals_one_process
    fsdp_data = str(_records(demo_data, tmp, "fsdp", slice(8, 12)))
    jobs = [
        {"name": "cache", "call": "rank_jobs:cli", "args": ["drivekd.cli.cache", [
            "build", "--teacher", "all", "--model", f"{tiny}/internvl-teacher", "--data", str(small_data), "--out",
            str(tmp / "cache"), "--no-progress"]]},
        {"name": "analyze", "call": "rank_jobs:cli", "args": ["drivekd.cli.analyze", [
            "--model", f"{tiny}/internvl-teacher", "--data", str(rw_data), "--images", images, "--out", str(tmp / "analysis"),
            "--temperatures", ",".join(f"{t:g}" for t in TAUS), "--no-progress"]]},
        {"name": "train", "call": "rank_jobs:cli", "args": ["drivekd.cli.train", _train_args(
            tiny_models, data6, demo_data, store, tmp / "train", tmp / "eval.json", 1)]},
        *({"name": f"contribution-{mode}", "call": "rank_jobs:contribution_run",
           "args": [tiny, images, str(contribution_data), str(tmp / "contribution" / mode), 1, mode]} for mode in ("fast", "calibrated")),
        {"name": "gram", "call": "rank_jobs:gram_blocks", "args": [tiny, images, gram_one["scales"], str(tmp / "gram.pt")]},
        # FSDP; the gradient-checkpointed run recomputes inside the layers that the captured maps' hooks
        # gather (no step checkpoints: the full Qwen2.5-VL run before it saves them, and a sharded save
        # costs about a step). Last: a kill -9 inside the step-2 sharded save ends the launch.
        *({"name": f"fsdp-{fam}", "call": "rank_jobs:fsdp_run", "args": [tiny, images, fsdp_data, fam, str(tmp / f"fsdp-{fam}"), FSDP, 0]}
          for fam in FAMILIES),
        {"name": "fsdp-checkpointing", "call": "rank_jobs:fsdp_run", "args": [
            tiny, images, fsdp_data, "qwen2_5_vl", str(tmp / "fsdp-checkpointing"),
            {**FSDP, "gradient_checkpointing": True, "save_every": 0}, 0]},
        {"name": "fsdp-killed", "call": "rank_jobs:fsdp_run", "args": [tiny, images, fsdp_data, "internvl", str(tmp / "fsdp-killed"), FSDP, 2]},
    ]
    return _launch(tmp, "jobs", jobs), tmp


@pytest.fixture(scope="module")
def resumed(launched, tiny_models, demo_data):
    """The second launch: --resume the killed FSDP run, then run the interpreter's exit handlers.
    Returns (process, the killed run's step checkpoints and unfinished saves before the resume)."""
    _, tmp = launched
    killed = tmp / "fsdp-killed"
    before = [s for s, _ in list_checkpoints(killed)], sorted(p.name for p in killed.glob(".tmp-*"))
    fsdp_data = str(tmp / "fsdp.json")
    jobs = [{"name": "fsdp-resume", "call": "rank_jobs:fsdp_run", "args": [
                str(tiny_models), str(demo_data), fsdp_data, "internvl", str(tmp / "fsdp-killed"), {**FSDP, "resume": True}, 0]},
            {"name": "exit", "call": "rank_jobs:exit_handlers"}]
    return _launch(tmp, "resume", jobs), before


def _train_args(tiny_models, data6, demo_data, store, out, eval_file, micro_batch: int) -> list[str]:  # noqa: F811
    return _args(tiny_models, data6, demo_data, store, out, "--max-steps", "2", "--grad-accum", "2", "--lr", "1e-3",
                 "--projection", "agp", "--save-every", "0", "--eval-data", str(eval_file), "--eval-generate",
                 "--eval-max-samples", "5", "--eval-max-new-tokens", "4", "--save-best", "eval/ce",
                 "--micro-batch", str(micro_batch))


def test_cache_build_equals_single(launched, built):  # noqa: F811
    p, tmp = launched
    _ran(p, "cache")
    assert _files(tmp / "cache") == _files(built)


def test_analyze_equals_one(launched, analysed):  # noqa: F811
    p, tmp = launched
    _ran(p, "analyze")
    _, want, _ = analysed
    got = json.loads((tmp / "analysis" / "analysis.json").read_text())
    for k in ("representation", "intra_consistency", "dispersion", "confidence"):
        assert got[k] == want[k], k


def test_train_equals_one_process(launched, tiny_models, data6, demo_data, store, tmp_path):  # noqa: F811
    """2 ranks x micro-batch 1 == 1 process x micro-batch 2 (same global batch), validation included:
    the ranks split the 12 eval samples and the 5 generated questions (3 + 2: uneven) and all-reduce
    sums and counts, so eval/ce and accuracy equal one process's, and best/ is saved."""
    p, tmp = launched
    _ran(p, "train")
    two, one = tmp / "train", tmp_path / "one"
    r = CliRunner().invoke(train_cli, _train_args(tiny_models, data6, demo_data, store, one, tmp / "eval.json", 2))
    assert r.exit_code == 0, r.output
    m2 = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    t2, t1 = [m for m in m2 if "loss" in m], [m for m in m1 if "loss" in m]
    assert [m["loss"] for m in t2] == pytest.approx([m["loss"] for m in t1], rel=1e-4)
    assert [m["samples_per_s"] > 0 for m in t2] == [True, True]
    # Projections fired, so the combine was non-linear: averaging after it would not match.
    assert all(m["projections_fired"] > 0 for m in t1)
    assert [m["projections_fired"] for m in t2] == [m["projections_fired"] for m in t1]
    assert t2[-1]["weights"] == pytest.approx(t1[-1]["weights"], rel=1e-4)
    a, b = load_file(str(two / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
    # validation, split over the ranks
    e2, e1 = ([m for m in ms if "eval_ce" in m][0] for ms in (m2, m1))
    assert e2["eval_samples"] == e1["eval_samples"] == 12 and e2["eval_generated"] == e1["eval_generated"] == 5
    assert e2["eval_ce"] == pytest.approx(e1["eval_ce"], rel=1e-4)
    acc2, acc1 = ({k: v for k, v in e.items() if k.startswith("eval_acc")} for e in (e2, e1))
    assert acc2 == acc1 and "eval_acc" in acc1
    assert (two / "best" / "COMPLETE").exists()


def test_shares_and_calibration_equal_one_process(launched, tiny_models, demo_data, tmp_path):
    """The fast path's measured Gram and the calibration's norms are of the rank-averaged gradients, as
    the projection's are: 2 ranks x micro-batch 1 == 1 process x micro-batch 2."""
    from online_targets import TEACHER_LAYERS, compute_targets

    from drivekd.data.loaders import load_samples

    p, tmp = launched
    data = tmp / "contribution.json"
    targets = compute_targets(tiny_models / "internvl-teacher", load_samples(data, demo_data), TEACHER_LAYERS)
    for mode in ("fast", "calibrated"):
        _ran(p, f"contribution-{mode}")
        two, one = tmp / "contribution" / mode, tmp_path / mode
        train(contribution_config(tiny_models, demo_data, data, one, 2, mode), targets)
        m2, m1 = ([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (two, one))
        assert len(m2) == len(m1) == 2
        for a, b in zip(m2, m1):
            for key in [f"{p}_{r}" for p in ("share", "along") for r in ROWS]:
                assert a[key] is not None and a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-9), (mode, key)
        if mode == "calibrated":
            c2, c1 = (json.loads((d / "run.json").read_text())["calibration"] for d in (two, one))
            assert c2["weights"] == pytest.approx(c1["weights"], rel=1e-4)


def test_gram_engine_equals_one_process(launched, gram_one):
    p, tmp = launched
    _ran(p, "gram")
    got = torch.load(tmp / "gram.pt", weights_only=True)
    assert got["blocks"] == gram_one["blocks"]
    torch.testing.assert_close(got["gram"], gram_one["gram"], rtol=1e-5, atol=1e-7)
    assert rel(got["grad"], gram_one["grad"]) < 1e-5
    # The cross-rank terms matter: the mean of the two ranks' own Grams is another matrix.
    assert not torch.allclose(got["gram"], gram_one["gram"] * 2, rtol=1e-3)


def test_fsdp_equals_one_process_and_resumes_exactly(launched, resumed, tiny_models, demo_data, tmp_path):
    """Both families, 2 FSDP ranks x micro-batch 1 == 1 process x 2 (here); (Qwen2.5-VL) also under
    --gradient-checkpointing; (InternVL) a kill -9 inside the step-2 sharded save leaves step 1 usable,
    and --resume from it finishes exactly the uninterrupted run (optimizer state, schedule, re-weighting).

    Samples [8:12]: a single view and a six-view group of three (a shared prefix). The final weights are
    compared at 1e-5 after 2 AdamW steps, whose normalised update (m / sqrt(v)) turns reduction-order
    noise in a near-zero gradient into a visible weight difference: measured here 3.5e-6 (InternVL) and
    5e-7 (Qwen2.5-VL); on the first four samples one such element of 8192 reached 1.6e-5."""
    from online_targets import TEACHER_LAYERS, compute_targets

    from drivekd.data.loaders import load_samples

    p, tmp = launched
    data = tmp / "fsdp.json"
    for job in ("fsdp-internvl", "fsdp-qwen2_5_vl", "fsdp-checkpointing"):
        _ran(p, job)
    assert p.returncode != 0 and "done fsdp-killed" not in p.stdout, p.stdout[-3000:]  # killed in the last job
    ckpt, killed = tmp / "fsdp-checkpointing", tmp / "fsdp-killed"
    for fam in FAMILIES:
        full, one = tmp / f"fsdp-{fam}", tmp_path / f"one-{fam}"
        targets = compute_targets(tiny_models / f"{fam}-teacher", load_samples(data, demo_data), TEACHER_LAYERS)
        train(fsdp_config(tiny_models, demo_data, data, fam, one, micro_batch=2, save_every=0), targets)  # compared: final/
        # FSDP == one process
        _close_lines(_lines(full), _lines(one), 1e-5)
        _close_weights(full / "final", one / "final", 1e-5)
        cfg = json.loads((full / "final" / "config.json").read_text())
        assert cfg["architectures"] == json.loads((one / "final" / "config.json").read_text())["architectures"]
        # Sharded step checkpoints: one DCP folder, no model files; final/ is the plain layout.
        step1 = full / "step-000001"
        assert (step1 / "sharded" / ".metadata").is_file() and len(list((step1 / "sharded").glob("*.distcp"))) == 2
        assert not (step1 / "model.safetensors").exists()
        if fam == "qwen2_5_vl":
            _close_lines(_lines(ckpt), _lines(one), 1e-5)
            _close_weights(ckpt / "final", one / "final", 1e-5)

    # kill -9 inside the second sharded save (step 2): step 1 stayed complete and usable; the
    # interrupted save's folder is never read...
    p2, (steps, unfinished) = resumed
    assert steps == [1] and unfinished == [".tmp-step-000002-fsdp"]
    # ...and --resume from it (the second launch) finishes exactly the uninterrupted run
    _ran(p2, "fsdp-resume")
    assert not list(killed.glob(".tmp-*")) and is_complete(killed / "step-000002")
    _close_lines(_lines(killed), _lines(tmp / "fsdp-internvl"), 1e-6)
    _close_weights(killed / "final", tmp / "fsdp-internvl" / "final", 1e-6)


def test_each_rank_destroys_its_process_group_at_exit(resumed):
    p, _ = resumed
    _ran(p, "exit")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank} initialized after exit handlers: False" in p.stdout, p.stdout
