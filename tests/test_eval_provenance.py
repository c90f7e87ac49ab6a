"""report.json says what was evaluated and how: model path and fingerprint, data hash, generation,
judge and deployment settings, versions; --name defaults to the training run's name."""

import hashlib
import json
import shutil

import pytest

from click.testing import CliRunner

from drivekd.cli.eval import main
from drivekd.eval.provenance import DEPLOY_NEW_TOKENS, checkpoint_fingerprint, default_model_name, run_name


def _run_folder(tiny_models, tmp_path):
    """A drivekd run as drivekd-train leaves it: RUN/run.json, RUN/final/, RUN/step-000002/."""
    run = tmp_path / "runs" / "kd-seed3"
    shutil.copytree(tiny_models / "qwen2_5_vl-student", run / "final")
    shutil.copytree(tiny_models / "qwen2_5_vl-student", run / "step-000002")
    (run / "run.json").write_text(json.dumps({"config": {"out": str(run), "recipe": "multi"}}))
    return run


def test_name_defaults_to_the_run(tiny_models, tmp_path):
    run = _run_folder(tiny_models, tmp_path)
    assert run_name(run / "final") == default_model_name(run / "final") == "kd-seed3"
    assert run_name(run / "step-000002") == "kd-seed3/step-000002"
    assert run_name(tiny_models / "qwen2_5_vl-student") is None
    assert default_model_name(tiny_models / "qwen2_5_vl-student") == "qwen2_5_vl-student"


def test_fingerprint_follows_every_byte(tiny_models, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(tiny_models / "internvl-student", a)
    before = checkpoint_fingerprint(a)
    assert before == checkpoint_fingerprint(tiny_models / "internvl-student")  # content, not location
    weights = bytearray((a / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of the last weight
    (a / "model.safetensors").write_bytes(bytes(weights))
    assert checkpoint_fingerprint(a) != before


@pytest.mark.slow
def test_report_records_provenance_and_deploy_protocol(tiny_models, demo_data, tmp_path):
    run = _run_folder(tiny_models, tmp_path)
    data = demo_data / "drivebench.json"
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["--model", str(run / "final"), "--data", str(data), "--out", str(out), "--limit", "2",
                                       "--max-new-tokens", "3", "--batch-size", "2", "--deploy", "--max-pixels", "50176"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "kd-seed3"  # not "final"
    p = report["provenance"]
    assert p["model"] == {"path": str((run / "final").resolve()), "fingerprint": checkpoint_fingerprint(run / "final"), "run": "kd-seed3"}
    assert p["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest() and p["data"]["limit"] == 2
    assert p["data"]["samples"] == 2
    assert p["generation"] == {"max_new_tokens": 3, "decoding": "greedy", "temperature": 0.0, "top_p": 1.0, "batch_size": 2}
    assert p["images"]["settings"] == {"max_pixels": 50176}
    assert p["judge"] is None
    assert set(p["versions"]) >= {"drivekd", "transformers", "torch"}
    # Deployment figures by the fixed protocol, not the accuracy run's 3 new tokens; stated in both outputs.
    assert report["deploy"]["max_new_tokens"] == DEPLOY_NEW_TOKENS == p["deploy"]["max_new_tokens"]
    md = (out / "report.md").read_text()
    assert f"Protocol: {DEPLOY_NEW_TOKENS} new tokens per generation (fixed" in md and "## Provenance" in md
    assert f"deployment: {DEPLOY_NEW_TOKENS} new tokens per generation (fixed)" in result.output


def test_score_records_predictions_hash_and_judge_settings(tmp_path):
    from drivekd.eval.judge import JudgeSettings
    from drivekd.eval.provenance import scoring_provenance

    preds = tmp_path / "predictions.json"
    preds.write_text("[]")
    p = scoring_provenance(preds, JudgeSettings(url="http://judge:8000/v1", model="judge-model", runs=3))
    assert p["predictions"]["sha256"] == hashlib.sha256(b"[]").hexdigest()
    assert p["judge"]["model"] == "judge-model" and p["judge"]["runs"] == 3 and p["judge"]["key_env"]  # the variable's name only
