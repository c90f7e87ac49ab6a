"""Generation half of evaluation on tiny checkpoints: records, resume after a kill, determinism,
deployment metrics, and the whole `drivekd-eval` path through the CLI."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from drivekd.cli.eval import main
from drivekd.data.loaders import load_samples
from drivekd.errors import ConfigError
from drivekd.eval.generate import generate_predictions, measure_deploy
from drivekd.eval.predictions import partial_path, read_predictions
from drivekd.eval.score import record_id, score_predictions
from drivekd.families import load_model

FAMILIES = ["internvl", "qwen2_5_vl"]
NEW = 6  # new tokens per answer: enough to tell answers apart, cheap on CPU


@pytest.fixture(scope="module")
def varied_models(tiny_models, tmp_path_factory) -> Path:
    """Copies of the tiny students with larger random weights.

    The stock tiny students answer every prompt with the same repeated byte, which would make
    "same preds" checks vacuous; these give a different answer to every sample.
    """
    out = tmp_path_factory.mktemp("varied-models")
    g = torch.Generator().manual_seed(0)
    for family in FAMILIES:
        dst = out / f"{family}-student"
        shutil.copytree(tiny_models / f"{family}-student", dst)
        model = load_model(dst, capture=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5, generator=g)
        model.save_pretrained(dst)
    return out


def _samples(demo_data: Path, name: str, n: int = 4):
    """`n` samples mixing one-view and six-view questions, so left padding really happens."""
    samples = load_samples(demo_data / name)
    one = [s for s in samples if len(s.images) == 1]
    six = [s for s in samples if len(s.images) == 6]
    assert one and six
    mixed = [x for pair in zip(one, six) for x in pair]
    return mixed[:n]


@pytest.mark.parametrize("family,data", [("internvl", "drivebench.json"), ("qwen2_5_vl", "train.json")])
def test_records_keep_every_field_and_add_pred(varied_models, demo_data, tmp_path, family, data):
    samples = _samples(demo_data, data)
    records = generate_predictions(varied_models / f"{family}-student", samples, tmp_path, batch_size=3,
                                   max_new_tokens=NEW, progress=False)
    assert len(records) == len(samples)
    assert records.resumed == [] and sorted(records.generated) == sorted(record_id(r) for r in records)
    for sample, rec in zip(samples, records):  # input order
        assert isinstance(rec["pred"], str)
        if sample.source == "drivebench":
            assert {k: v for k, v in rec.items() if k != "pred"} == sample.record
        else:  # Drive-KD records become DriveBench-like ones
            assert rec["id"] == sample.id and record_id(rec) == sample.id
            assert rec["question"] == sample.question and rec["answer"] == sample.answer
            assert rec["question_type"] == sample.capability
            assert rec["image_path"] == sample.record["images"]
    assert len({r["pred"] for r in records}) > 1  # really answered per sample
    assert read_predictions(tmp_path / "predictions.json") == list(records)
    assert not partial_path(tmp_path / "predictions.json").exists()
    score_predictions(records)  # the scorer accepts them as they are


def test_resume_after_kill_generates_only_missing_ids(varied_models, demo_data, tmp_path):
    model = varied_models / "qwen2_5_vl-student"
    samples = _samples(demo_data, "drivebench.json")
    first = generate_predictions(model, samples, tmp_path / "full", batch_size=1, max_new_tokens=NEW, progress=False)
    ids = [record_id(r) for r in first]

    # A run killed while writing its second progress line: one whole line, then half a line.
    run = tmp_path / "killed"
    run.mkdir()
    lines = [json.dumps({"id": rid, "pred": rec["pred"]}) for rid, rec in zip(ids, first)]
    lines[0] = json.dumps({"id": ids[0], "pred": "kept from the first run"})  # tells kept from regenerated
    partial_path(run / "predictions.json").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])

    second = generate_predictions(model, samples, run, batch_size=1, max_new_tokens=NEW, progress=False)
    assert second.resumed == ids[:1]
    assert sorted(second.generated) == sorted(ids[1:])
    assert second[0]["pred"] == "kept from the first run"
    assert [r["pred"] for r in second[1:]] == [r["pred"] for r in first[1:]]
    assert not partial_path(run / "predictions.json").exists()

    # A finished predictions.json counts too: only the new sample is generated...
    more = load_samples(demo_data / "drivebench.json")
    extra = next(s for s in more if s.id not in {x.id for x in samples})
    third = generate_predictions(model, [*samples, extra], run, batch_size=1, max_new_tokens=NEW, progress=False)
    assert third.generated == [record_id(extra.record)] and third.resumed == ids
    # ...and when nothing is left the model is not even loaded.
    fourth = generate_predictions(tmp_path / "no-such-model", [*samples, extra], run, progress=False)
    assert fourth.generated == [] and list(fourth) == list(third)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_deterministic_and_padding_free(varied_models, demo_data, tmp_path, family):
    model = varied_models / f"{family}-student"
    samples = _samples(demo_data, "drivebench.json")
    a = generate_predictions(model, samples, tmp_path / "a", batch_size=4, max_new_tokens=NEW, progress=False)
    b = generate_predictions(model, samples, tmp_path / "b", batch_size=4, max_new_tokens=NEW, progress=False)
    one = generate_predictions(model, samples, tmp_path / "one", batch_size=1, max_new_tokens=NEW, progress=False)
    assert [r["pred"] for r in a] == [r["pred"] for r in b]
    # Left padding in a batch of mixed one- and six-view prompts does not change any answer.
    assert [r["pred"] for r in a] == [r["pred"] for r in one]


def test_sampling_runs_with_a_seed(varied_models, demo_data, tmp_path):
    model = varied_models / "internvl-student"
    samples = _samples(demo_data, "drivebench.json", n=2)
    preds = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        out = generate_predictions(model, samples, tmp_path / name, batch_size=2, max_new_tokens=NEW,
                                   temperature=1.0, top_p=0.9, progress=False)
        preds.append([r["pred"] for r in out])
    assert preds[0] == preds[1]


def test_measure_deploy_keys_and_values(tiny_models, demo_data):
    samples = _samples(demo_data, "drivebench.json", n=2)
    m = measure_deploy(tiny_models / "internvl-student", samples, runs=2, max_new_tokens=4)
    assert m["peak_memory_gb"] > 0 and m["tokens_per_s"] > 0 and m["ttft_s"] > 0
    assert m["memory_kind"] == "process_peak_rss"  # CPU
    assert (m["device"], m["dtype"], m["runs"], m["batch_size"], m["max_new_tokens"]) == ("cpu", "float32", 2, 1, 4)
    assert m["prompt_tokens"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_deploy_on_gpu(tiny_models, demo_data):
    samples = _samples(demo_data, "drivebench.json", n=2)
    m = measure_deploy(tiny_models / "qwen2_5_vl-student", samples, runs=2, max_new_tokens=4, batch_size=2)
    assert m["memory_kind"] == "cuda_max_memory_allocated" and m["dtype"] == "bfloat16"
    assert m["peak_memory_gb"] > 0 and m["tokens_per_s"] > 0 and m["ttft_s"] > 0


def test_unavailable_device_is_a_config_error(tiny_models, demo_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    samples = _samples(demo_data, "drivebench.json", n=1)
    with pytest.raises(ConfigError, match="cpu"):
        generate_predictions(tiny_models / "internvl-student", samples, tmp_path, device="cuda", progress=False)


@pytest.mark.slow
def test_cli_generates_scores_and_reports(tiny_models, demo_data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "--model", str(tiny_models / "qwen2_5_vl-student"), "--data", str(demo_data / "drivebench.json"),
        "--out", str(out), "--limit", "4", "--deploy", "--max-new-tokens", "4", "--batch-size", "2",
    ])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.json", "report.png", "predictions.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["n_records"] == 4 and report["model"] == "qwen2_5_vl-student"
    deploy = report["deploy"]
    assert deploy["peak_memory_gb"] > 0 and deploy["tokens_per_s"] > 0 and deploy["ttft_s"] > 0
    assert deploy["memory_kind"] == "process_peak_rss"
    assert len(read_predictions(out / "predictions.json")) == 4
