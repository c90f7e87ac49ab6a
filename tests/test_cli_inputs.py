"""Bad inputs every command refuses in one line: image paths that escape the image root (naming the
record and --allow-outside-images; with the flag the same data is read), and --out naming a file."""

import json
import shutil

import pytest
from click.testing import CliRunner

from drivekd.cli.analyze import main as analyze_cli
from drivekd.cli.cache import main as cache_cli
from drivekd.cli.train import main as train_cli


@pytest.fixture(scope="module")
def escaping(demo_data, tmp_path_factory):
    """Two single-view demo records whose image lies beside the data folder: `../img/...`."""
    d = tmp_path_factory.mktemp("escape")
    recs = [r for r in json.loads((demo_data / "train.json").read_text()) if len(r["images"]) == 1][:2]
    (d / "img").mkdir()
    for r in recs:
        src = demo_data / r["images"][0]
        shutil.copy(src, d / "img" / src.name)
        r["images"] = [f"../img/{src.name}"]
    (d / "data").mkdir()
    (d / "data" / "train.json").write_text(json.dumps(recs))
    return d / "data" / "train.json"


def _refused(r):
    assert r.exit_code != 0
    assert "outside the image root" in r.output and "--allow-outside-images" in r.output and "record 0" in r.output
    assert "Traceback" not in r.output


def test_cache_build_refuses_then_accepts(tiny_models, escaping, tmp_path):
    args = ["build", "--teacher", "planning", "--model", str(tiny_models / "internvl-teacher"), "--data", str(escaping),
            "--out", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    _refused(CliRunner().invoke(cache_cli, args))
    r = CliRunner().invoke(cache_cli, args + ["--allow-outside-images"])
    assert r.exit_code == 0, r.output


def test_train_refuses_then_accepts(tiny_models, escaping, tmp_path):
    args = ["--recipe", "sft", "--student", str(tiny_models / "internvl-student"), "--data", str(escaping),
            "--out", str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0", "--no-progress", "--report-to", "none"]
    _refused(CliRunner().invoke(train_cli, args))
    r = CliRunner().invoke(train_cli, args + ["--allow-outside-images"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "final").is_dir()


def test_analyze_refuses(tiny_models, escaping, tmp_path):
    _refused(CliRunner().invoke(analyze_cli, ["--model", str(tiny_models / "internvl-teacher"), "--data", str(escaping),
                                              "--out", str(tmp_path / "an"), "--no-progress"]))


def test_eval_refuses(tiny_models, escaping, tmp_path):
    from drivekd.cli.eval import main as eval_cli

    _refused(CliRunner().invoke(eval_cli, ["--model", str(tiny_models / "internvl-student"), "--data", str(escaping),
                                           "--out", str(tmp_path / "ev")]))


def test_out_naming_an_existing_file_is_one_error(tiny_models, escaping, tmp_path):
    # Once a NotADirectoryError / FileExistsError traceback from drivekd-train and drivekd-eval.
    from drivekd.cli.eval import main as eval_cli

    f = tmp_path / "notes.txt"
    f.write_text("x")
    r = CliRunner().invoke(train_cli, ["--recipe", "sft", "--student", str(tiny_models / "internvl-student"), "--data", str(escaping),
                                       "--allow-outside-images", "--out", str(f), "--max-steps", "1", "--no-progress"])
    assert r.exit_code != 0 and "--out" in r.output and "existing file" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(eval_cli, ["--model", str(tiny_models / "internvl-student"), "--data", str(escaping), "--out", str(f)])
    assert r.exit_code != 0 and "--out" in r.output and "existing file" in r.output and "Traceback" not in r.output
