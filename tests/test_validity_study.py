"""tools/validity_study.py --quick: benchmark splits -> one store -> CE / single / multi students ->
held-out evaluation -> Table-4 layout report, in seconds on the demo scenes."""

import importlib.util
import json
from pathlib import Path

import pytest

from drivekd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _study_module():
    spec = importlib.util.spec_from_file_location("validity_study", ROOT / "tools" / "validity_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """Demo scenes split by scene, named as drivekd.demo.benchmark names them: train.json (Drive-KD records
    of scenes 0-3), val_drivebench.json and heldout_drivebench.json
    (DriveBench records of scenes 4 and 5), images shared under one root."""
    from drivekd.demo.scenes import make_demo_data

    root = tmp_path_factory.mktemp("bench")
    make_demo_data(root, groups=6, questions_per_group=3, seed=3)
    train = json.loads((root / "train.json").read_text())
    bench = json.loads((root / "drivebench.json").read_text())
    frames = list(dict.fromkeys(r["frame_token"] for r in bench))
    scene_of = lambda rec: next(f for f in frames if f in rec["images"][0])  # noqa: E731
    (root / "train.json").write_text(json.dumps([r for r in train if frames.index(scene_of(r)) < 4]))
    (root / "val_drivebench.json").write_text(json.dumps([r for r in bench if r["frame_token"] == frames[4]]))
    (root / "heldout_drivebench.json").write_text(json.dumps([r for r in bench if r["frame_token"] == frames[5]]))
    return root


def test_quick_study_writes_the_table(tiny_models, benchmark, tmp_path):
    from click.testing import CliRunner

    vs = _study_module()
    res = CliRunner().invoke(vs.main, ["--teacher", str(tiny_models / "internvl-teacher"), "--benchmark", str(benchmark),
                                       "--out", str(tmp_path / "study"), "--quick", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert study["failed"] == [] and study["seeds"] == [1] and study["steps"] == 1
    assert study["student"] == str(tmp_path / "study" / "student-init")  # the default: the tiny demo student config
    assert study["train_capabilities"] == {"perception": 2, "reasoning": 2, "planning": 2}
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    rows = [r["row"] for r in report["rows"]]
    assert rows == ["CE", "CE (all samples)", "Ours (single-teacher)", "Multi-teacher", "Multi-teacher (G1)",
                    "Multi-teacher (G2)", "Ours (multi-teacher)"]
    assert all(r["status"] is None for r in report["runs"])  # every run trained and was evaluated
    # Evaluated on the held-out split, every record of it.
    heldout = json.loads((benchmark / "heldout_drivebench.json").read_text())
    ev = json.loads((tmp_path / "study" / "eval" / "multi-agp" / "seed-1" / "report.json").read_text())
    assert ev["n_records"] == len(heldout) == study["eval_records"]
    md = (tmp_path / "study" / "report.md").read_text()
    assert "| Ours (multi-teacher) |" in md and "Study wall time:" in md
    assert (tmp_path / "study" / "report.png").is_file()
    assert study["wall_seconds"] > 0


def test_overlapping_splits_are_refused(tiny_models, benchmark, tmp_path):
    vs = _study_module()
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "images").symlink_to(benchmark / "images")
    (leaky / "train.json").write_text((benchmark / "train.json").read_text())
    train = json.loads((benchmark / "train.json").read_text())
    (leaky / "heldout.json").write_text(json.dumps(train[:2]))  # held-out questions on training images
    with pytest.raises(ConfigError, match="heldout split shares .* image\\(s\\) with train"):
        vs.run_study(tiny_models / "internvl-teacher", tiny_models / "internvl-student", leaky, tmp_path / "s",
                     seeds=[1], train_samples=6, steps=1)
