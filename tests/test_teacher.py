"""The committed trained tiny teacher, and tools/train_teacher.py that rebuilds it."""

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from drivekd.demo import benchmark as bm

REPO = Path(__file__).resolve().parents[1]
CAPS = ("perception", "reasoning", "planning")


def _record() -> dict:
    return json.loads((bm.TEACHER_DIR / "training_record.json").read_text())


def test_committed_teacher_is_small_and_recorded():
    files = {p.name for p in bm.TEACHER_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "training_record.json"} <= files
    assert (bm.TEACHER_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    rec = _record()
    assert rec["seed"] == 0 and rec["steps"] > 0 and rec["train_wall_s"] > 0
    for split in ("val", "heldout"):
        for cap in CAPS:
            assert rec["accuracy"][split][cap] > rec["prior_accuracy"][split][cap] + 5, (split, cap)


def test_committed_teacher_beats_the_prior_on_a_heldout_slice(tmp_path, one_thread):
    """The teacher loads through drivekd-eval and answers held-out scenes it never saw, above chance.

    The slice is the first 6 held-out scenes of the teacher's benchmark (seed 0): the split is seeded
    apart from the train split, so these scenes are not in what the teacher was trained on.
    """
    from drivekd.cli.eval import main as eval_main

    bench = tmp_path / "bench"
    bm.make_benchmark(bench, seed=0, train=1, val=0, heldout=6)
    res = CliRunner().invoke(eval_main, [
        "--model", str(bm.TEACHER_DIR), "--data", str(bench / "heldout_drivebench.json"), "--images", str(bench),
        "--out", str(tmp_path / "eval"), "--max-new-tokens", "10", "--batch-size", "36"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    records = json.loads((bench / "heldout_drivebench.json").read_text())
    for cap in CAPS:
        rs = [r for r in records if bm.QUESTIONS[r["kind"]][0] == cap]
        # Chance: the best constant letter per question kind, chosen on this very slice (an upper bound
        # of any answer that ignores the image).
        best = sum(max(sum(r["answer"] == x for r in rs if r["kind"] == k) for x in "ABCD") for k in {r["kind"] for r in rs})
        chance = 100.0 * best / len(rs)
        acc = report["capabilities"][cap]["mcq_accuracy"]
        assert report["capabilities"][cap]["mcq_total"] == 12
        assert acc >= chance + 15, (cap, acc, chance)


def _tool():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import train_teacher
    finally:
        sys.path.pop(0)
    return train_teacher


@pytest.mark.slow
def test_train_teacher_quick_runs_end_to_end(tmp_path, monkeypatch):
    """Its main() in this process; the drivekd-train and drivekd-eval it runs are its own subprocesses."""
    out = tmp_path / "teacher"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(sys, "argv", ["tools/train_teacher.py", "--out", str(out), "--quick"])  # the record's command
    res = CliRunner().invoke(_tool().main, sys.argv[1:])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "training_record.json").read_text())
    assert rec["steps"] == 4 and set(rec["accuracy"]) == {"val"}
    assert set(rec["accuracy"]["val"]) == set(CAPS)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # The copied checkpoint is the trained one, not the init: its weights differ from the init's.
    from safetensors.torch import load_file

    trained, init = load_file(out / "model.safetensors"), load_file(tmp_path / "teacher.work" / "init" / "model.safetensors")
    assert any(not (trained[k] == init[k]).all() for k in init)


def test_train_teacher_names_a_missing_benchmark(tmp_path):
    res = CliRunner().invoke(_tool().main, ["--out", str(tmp_path / "t"), "--bench", str(tmp_path / "nope")])
    assert res.exit_code != 0
    assert "--bench" in res.output and "drivekd.demo.benchmark" in res.output


def test_committed_student_answers_in_the_template(tmp_path, one_thread):
    """The format-pretrained student (make demo's student) states a readable letter for every question."""
    from drivekd.cli.eval import main as eval_main

    bench = tmp_path / "bench"
    bm.make_benchmark(bench, seed=0, train=1, val=0, heldout=2)
    res = CliRunner().invoke(eval_main, [
        "--model", str(bm.STUDENT_DIR), "--data", str(bench / "heldout_drivebench.json"), "--images", str(bench),
        "--out", str(tmp_path / "eval"), "--max-new-tokens", "10", "--batch-size", "12"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["unanswerable"]["count"] == 0
