"""End to end across formats: a teacher store built from a DriveLM file trains a student, which is
evaluated and exported to a RoboSense results.json that `drivekd-eval score` reads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

FIX = Path(__file__).parent / "fixtures" / "formats"


@pytest.mark.slow  # teacher pass + 1 training step + generation on tiny models
def test_drivelm_store_trains_student_exported_to_robosense(tiny_models, demo_data, tmp_path):
    from drivekd.cli.cache import main as cache_cli
    from drivekd.cli.eval import main as eval_cli
    from drivekd.cli.train import main as train_cli

    # DriveLM as it ships: the JSON in its own folder, images as ../nuscenes/samples/CAM_*/<file>;
    # the demo scene's camera images stand in for the two fixture frames.
    data = tmp_path / "drivelm" / "test.json"
    data.parent.mkdir()
    shutil.copy(FIX / "drivelm_test.json", data)
    root = tmp_path / "nusc"
    scene = next(p for p in (demo_data / "images").iterdir() if (p / "CAM_BACK.png").is_file())
    for frame in ("f1", "f2"):
        for cam in ("CAM_FRONT", "CAM_BACK"):
            (root / "samples" / cam).mkdir(parents=True, exist_ok=True)
            shutil.copy(scene / f"{cam}.png", root / "samples" / cam / f"{frame}.png")

    runner = CliRunner()
    r = runner.invoke(cache_cli, ["build", "--teacher", "perception", "--model", str(tiny_models / "internvl-teacher"),
                                  "--data", str(data), "--images", str(root), "--out", str(tmp_path / "cache"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(train_cli, ["--cache", str(tmp_path / "cache"), "--student", str(tiny_models / "internvl-student"),
                                  "--data", str(data), "--images", str(root), "--out", str(tmp_path / "run"),
                                  "--recipe", "perception", "--max-steps", "1", "--num-workers", "0", "--no-progress",
                                  "--report-to", "none"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval"
    r = runner.invoke(eval_cli, ["--model", str(tmp_path / "run" / "final"), "--data", str(data), "--images", str(root),
                                 "--out", str(out), "--format", "robosense", "--max-new-tokens", "4", "--batch-size", "4",
                                 "--no-language"])
    assert r.exit_code == 0, r.output
    assert "RoboSense phase 1 n/a" in r.output and "partial: missing LLM score" in r.output  # no judge

    results = json.loads((out / "results.json").read_text())
    preds = {rec["id"]: rec["pred"] for rec in json.loads((out / "predictions.json").read_text())}
    reference = json.loads(data.read_text())
    assert len(results) == len(preds) == 9
    first = results[0]
    assert set(first) == {"scene_token", "frame_token", "question", "answer", "category", "img_paths"}
    assert (first["scene_token"], first["frame_token"], first["category"]) == ("s1", "f1", "perception")
    assert first["img_paths"] == reference["s1"]["key_frames"]["f1"]["image_paths"]
    assert sorted(r["answer"] for r in results) == sorted(preds.values())  # the student's answers, not the references
    challenge = json.loads((out / "challenge.json").read_text())
    assert challenge["challenge"] == "robosense" and challenge["n_mcq"] == 3 and challenge["n_vqa"] == 6

    # Read back from the file alone (with the DriveLM file as reference): the same numbers.
    again = tmp_path / "again"
    r = runner.invoke(eval_cli, ["score", str(out / "results.json"), "--data", str(data), "--out", str(again),
                                 "--no-language"])
    assert r.exit_code == 0, r.output
    rescored = json.loads((again / "challenge.json").read_text())
    assert rescored["mcq_accuracy"] == challenge["mcq_accuracy"] and rescored["breakdown"] == challenge["breakdown"]

    # The same predictions as a DriveLM output.json: the finished predictions.json is resumed (no model
    # runs again), exported with the challenge's submission ids, and scored by DriveLM's rules.
    lm_out = tmp_path / "eval-drivelm"
    shutil.copytree(out, lm_out)
    r = runner.invoke(eval_cli, ["--model", str(tmp_path / "run" / "final"), "--data", str(data), "--images", str(root),
                                 "--out", str(lm_out), "--format", "drivelm", "--no-language"])
    assert r.exit_code == 0, r.output
    output = json.loads((lm_out / "output.json").read_text())
    assert [e["id"] for e in output] == [f"s1_f1_{i}" for i in range(5)] + [f"s1_f2_{i}" for i in range(4)]
    assert sorted(e["answer"] for e in output) == sorted(preds.values())
    lm = json.loads((lm_out / "challenge.json").read_text())
    assert lm["challenge"] == "drivelm" and lm["final"] is None and lm["match"]["f1"] is not None
    assert "DriveLM final n/a" in r.output and "partial: missing chatgpt" in r.output
