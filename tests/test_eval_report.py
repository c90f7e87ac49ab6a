"""`drivekd-eval score` / `compare` end to end, predictions files, resume."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from drivekd.cli.eval import main
from drivekd.eval.predictions import (
    PartialWriter,
    finalize_predictions,
    load_existing,
    load_partial,
    partial_path,
    read_predictions,
    write_predictions,
)

OPTS = " Please select the correct answer from the following options: A. Going ahead. B. Turn right. C. Turn left. D. Stopped."

# Per frame: correctness of its reasoning MCQs and of its planning MCQs (1 = right, 0 = wrong).
TABLE = {
    "f1": ([1, 1], [1, 1]),
    "f2": ([1, 0], [1, 0]),
    "f3": ([0, 0], [0, 1]),
    "f4": ([1, 0], [0, 0]),
    "f5": ([1, 1], [1, 0]),
    "f6": ([0, 0], []),  # no planning: not in the consistency
}
PERCEPTION = {"f1": 1, "f2": 0, "f3": 1, "f4": 1, "f5": 0, "f6": 1}


def record(i, frame, qtype, correct, wrong_pred="B"):
    answer = "ABCD"[i % 4]
    pred = f"Final: {answer}. Support: a car is ahead." if correct else wrong_pred
    if wrong_pred == "B" and answer == "B" and not correct:
        pred = "D"
    return {
        "scene_token": "scene-1",
        "frame_token": frame,
        "question_type": qtype,
        "question": f"Q{i} about <c1,CAM_FRONT,0.5,0.5>?{OPTS}",
        "answer": answer,
        "tag": [0],
        "image_path": {"CAM_FRONT": f"samples/CAM_FRONT/{frame}.jpg", "CAM_BACK": f"samples/CAM_BACK/{frame}.jpg"},
        "extra_field": {"kept": i},
        "pred": pred,
    }


def make_records():
    records, i = [], 0
    for frame, (reasoning, planning) in TABLE.items():
        for k, ok in enumerate(reasoning):
            records.append(record(i, frame, "behavior" if k == 0 else "prediction", ok)); i += 1
        for ok in planning:
            records.append(record(i, frame, "planning", ok)); i += 1
        # perception: wrong ones answer with the article trap (unanswerable, counted wrong)
        records.append(record(i, frame, "perception", PERCEPTION[frame], wrong_pred="There is a pedestrian.")); i += 1
    # open questions without judge grades: outside the accuracy and the consistency
    records.append({**record(i, "f1", "planning", 1), "tag": [1], "answer": "Keep going.", "pred": "Slow down."})
    records.append({**record(i + 1, "f2", "perception", 1), "tag": [2], "answer": "A car.", "pred": "A bus."})
    return records


def ranks(x):
    """Average ranks by the direct formula: 1 + #smaller + (#equal - 1) / 2."""
    x = np.asarray(x, dtype=float)
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


def test_score_command_numbers(tmp_path):
    records = make_records()
    pred_file = tmp_path / "in" / "predictions.json"
    pred_file.parent.mkdir()
    pred_file.write_text(json.dumps(records))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["score", str(pred_file), "--out", str(out), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())

    reasoning = [ok for r, _ in TABLE.values() for ok in r]
    planning = [ok for _, p in TABLE.values() for ok in p]
    perception = list(PERCEPTION.values())
    expected = {c: 100.0 * sum(v) / len(v) for c, v in (("perception", perception), ("reasoning", reasoning), ("planning", planning))}
    for cap, value in expected.items():
        assert report["table1"][cap] == pytest.approx(value)
        assert report["capabilities"][cap]["mcq_total"] == len({"perception": perception, "reasoning": reasoning, "planning": planning}[cap])
    assert report["table1"]["average"] == pytest.approx(np.mean(list(expected.values())))
    assert report["question_types"]["behavior"]["mcq_accuracy"] == pytest.approx(100.0 * np.mean([r[0] for r, _ in TABLE.values()]))
    assert report["unanswerable"]["count"] == perception.count(0)
    assert report["model"] == "tiny"

    frames = [f for f, (_, p) in TABLE.items() if p]
    r_means = [100.0 * np.mean(TABLE[f][0]) for f in frames]
    p_means = [100.0 * np.mean(TABLE[f][1]) for f in frames]
    cons = report["consistency"]
    assert cons["n_groups"] == len(frames) == 5
    assert cons["pearson"] == pytest.approx(np.corrcoef(r_means, p_means)[0, 1])
    assert cons["spearman"] == pytest.approx(np.corrcoef(ranks(r_means), ranks(p_means))[0, 1])

    md = (out / "report.md").read_text()
    assert "| Model | Perception | Reasoning | Planning | Average | Memory (GB) | tok/s | TTFT (s) |" in md
    assert f"| tiny | {expected['perception']:.2f} | {expected['reasoning']:.2f} | {expected['planning']:.2f} |" in md
    assert "Spearman" in md and "Unanswerable" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_command(tmp_path):
    records = make_records()
    runner = CliRunner()
    for name, flip in (("base", False), ("distilled", True)):
        recs = [{**r, "pred": r["answer"]} if flip else r for r in records]
        (tmp_path / f"{name}.json").write_text(json.dumps(recs))
        result = runner.invoke(main, ["score", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["compare", str(tmp_path / "base"), str(tmp_path / "distilled"), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| base |" in md and "| distilled | 100.00 | 100.00 | 100.00 | 100.00 |" in md
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["model"] for r in rows] == ["base", "distilled"]


def test_errors_are_one_line_and_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["score", str(tmp_path / "missing.json")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_type": "perception", "question": "q", "answer": "A"}]))
    result = runner.invoke(main, ["score", str(bad)])
    assert result.exit_code == 2 and "no 'pred' field" in result.output

    result = runner.invoke(main, ["--model", str(tmp_path)])  # generation needs --data and --out
    assert result.exit_code == 2 and "--data, --out" in result.output

    result = runner.invoke(main, ["compare", str(tmp_path), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "no report" in result.output


def test_drivebench_round_trip(tmp_path):
    records = make_records()
    path = tmp_path / "predictions.json"
    write_predictions(path, records)
    assert read_predictions(path) == records  # every original field plus "pred"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]  # no temporary file left

    inputs = [{k: v for k, v in r.items() if k != "pred"} for r in records]
    ids = [f"id{i}" for i in range(len(inputs))]
    out = finalize_predictions(path, inputs, {rid: r["pred"] for rid, r in zip(ids, records)}, ids=ids)
    assert out == records == read_predictions(path)


def test_resume_from_partial_with_truncated_line(tmp_path):
    pred_path = tmp_path / "predictions.json"
    part = partial_path(pred_path)
    assert part.name == "predictions.partial.jsonl"
    with PartialWriter(part) as progress:
        for i in range(3):
            progress.write(f"id{i}", f"pred {i}")
    with open(part, "a") as f:  # killed in the middle of a write
        f.write('{"id": "id3", "pre')
    assert load_partial(part) == {f"id{i}": f"pred {i}" for i in range(3)}
    assert load_existing(pred_path) == {f"id{i}": f"pred {i}" for i in range(3)}

    with PartialWriter(part) as progress:  # the resumed run appends after the broken line
        progress.write("id3", "pred 3")
    assert load_existing(pred_path) == {f"id{i}": f"pred {i}" for i in range(4)}

    inputs = [{"frame_token": "f", "question": f"q{i}", "question_type": "perception", "answer": "A"} for i in range(5)]
    ids = [f"id{i}" for i in range(5)]
    with pytest.raises(Exception, match="1 of 5 records have no prediction yet"):
        finalize_predictions(pred_path, inputs, load_existing(pred_path), ids=ids)
    with PartialWriter(part) as progress:
        progress.write("id4", "pred 4")
    out = finalize_predictions(pred_path, inputs, load_existing(pred_path), ids=ids)
    assert [r["pred"] for r in out] == [f"pred {i}" for i in range(5)]
    assert not part.exists()  # folded into predictions.json
    assert load_existing(pred_path, ids=ids) == {f"id{i}": f"pred {i}" for i in range(5)}


def test_generation_mode_with_a_stub_generator(tmp_path, monkeypatch):
    """The CLI's generation path, with the loader and the generator replaced by stubs."""
    import sys
    import types

    records = make_records()
    data = tmp_path / "drivebench.json"
    data.write_text(json.dumps([{k: v for k, v in r.items() if k != "pred"} for r in records]))
    model_dir, images = tmp_path / "student", tmp_path / "images"
    model_dir.mkdir()
    images.mkdir()
    calls = {}

    def load_samples(path, images_root=None, allow_outside_images=False):
        calls["load"] = (path, images_root)
        return [types.SimpleNamespace(id=f"s{i}", record=r) for i, r in enumerate(json.loads(path.read_text()))]

    def generate_predictions(model_dir, samples, out_dir, batch_size, max_new_tokens, temperature, top_p, progress=True, **kw):
        calls["generate"] = (len(samples), batch_size, max_new_tokens, temperature, top_p)
        return [{**s.record, "pred": s.record["answer"]} for s in samples]

    def measure_deploy(model_dir, samples, **kw):
        return {"peak_memory_gb": 4.1, "tokens_per_s": 45.7, "ttft_s": 0.45}

    monkeypatch.setitem(sys.modules, "drivekd.data.loaders", types.SimpleNamespace(load_samples=load_samples))
    monkeypatch.setitem(sys.modules, "drivekd.eval.generate", types.SimpleNamespace(
        generate_predictions=generate_predictions, measure_deploy=measure_deploy))

    runner = CliRunner()
    base = tmp_path / "base"
    (tmp_path / "base.json").write_text(json.dumps(records))
    assert runner.invoke(main, ["score", str(tmp_path / "base.json"), "--out", str(base)]).exit_code == 0

    bad = runner.invoke(main, ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "x"), "--top-p", "0"])
    assert bad.exit_code == 2 and "--top-p" in bad.output and "generate" not in calls  # checked before loading

    out = tmp_path / "run"
    result = runner.invoke(main, [
        "--model", str(model_dir), "--data", str(data), "--images", str(images), "--out", str(out),
        "--batch-size", "2", "--max-new-tokens", "16", "--deploy", "--limit", "12", "--compare", str(base),
    ])
    assert result.exit_code == 0, result.output
    assert calls["generate"] == (12, 2, 16, 0.0, 1.0)
    report = json.loads((out / "report.json").read_text())
    assert report["n_records"] == 12 and report["model"] == "student"
    assert report["deploy"] == {"peak_memory_gb": 4.1, "tokens_per_s": 45.7, "ttft_s": 0.45}
    assert "| student |" in (out / "report.md").read_text() and "| 4.1 | 45.7 | 0.45 |" in (out / "report.md").read_text()
    assert len(read_predictions(out / "predictions.json")) == 12
    assert (out / "compare" / "comparison.md").exists()
