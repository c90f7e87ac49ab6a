"""DriveLM and RoboSense submission layouts and challenge scores (drivekd.eval.formats / challenge / language).

The fixtures (tests/fixtures/formats/) are hand-written; every expected number below is worked out
by hand from the challenges' formulas (DriveLM challenge/evaluation.py, RoboSense Track 1 README)
or, for the language metrics, from the definitions of the COCO caption scorers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from drivekd.cli.eval import main
from drivekd.errors import DataError
from drivekd.eval import challenge as ch
from drivekd.eval.formats import export_predictions, load_reference, read_submission
from drivekd.eval.report import score_submission
from test_eval_judge import JudgeServer, no_proxy, reply  # noqa: F401 (no_proxy: autouse fixture)

FIX = Path(__file__).parent / "fixtures" / "formats"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption metrics' PTB tokenizer is Java")

# Judge grades of the DriveLM fixture's tag-1 and tag-3 questions, by submission id.
GRADES = {"s1_f1_0": 40.0, "s1_f1_3": 80.0, "s1_f2_0": 90.0, "s1_f2_2": 60.0}


def drivelm_answers() -> dict[str, str]:
    return {e["id"]: e["answer"] for e in json.loads((FIX / "drivelm_output.json").read_text())}


def fixture_grader(items):
    return {cid: GRADES[cid] for cid, *_ in items}


# Hand computation of the DriveLM fixture's numbers ------------------------------------------------
# Language (tag 2), PTB-tokenized: pair 1 = "the ego vehicle is going straight" vs the 12-token
# reference "the ego vehicle is going straight the ego vehicle is driving slowly"; pair 2 identical
# ("the ego vehicle is turning left"). Every n-gram of both predictions is in its reference, so each
# BLEU-n precision is 1 and BLEU-n = the brevity penalty exp(1 - 18 / 12).
BLEU = math.exp(1 - 18 / 12)
# ROUGE-L (beta 1.2): pair 1 LCS 6, P = 1, R = 6 / 12; pair 2 = 1.
ROUGE_1 = (1 + 1.2**2) * 1 * 0.5 / (0.5 + 1.2**2 * 1)
ROUGE = (ROUGE_1 + 1.0) / 2
# CIDEr-D: two references, so idf = log 2 for n-grams of one reference and 0 for those in both
# ("the ego vehicle is" and its parts). Pair 2 is identical: cosine 1 for n = 1..4, no length
# penalty -> 10. Pair 1: the prediction keeps 2 of the reference's 4 / 5 / 6 / 7 rare n-grams
# (n = 1..4), all with count 1, so cos_n = 2 / sqrt(2 * k_n); length penalty exp(-(6 - 12)^2 / (2 * 6^2)).
COS = [2 / math.sqrt(2 * k) for k in (4, 5, 6, 7)]
CIDER = (10 * sum(COS) / 4 * math.exp(-36 / 72) + 10.0) / 2
LANGUAGE = 4 * BLEU / 4 / 3 + ROUGE / 3 + CIDER / 10 / 3
# Match (tag 3): frame 1 predicts (105, 203) -> reference (100, 200) at L1 8 < 16 (TP) and (900, 100)
# -> nearest left (500, 300) at 600 (FP); 2 references: P = R = 1/2, F1 = 1/2. Frame 2: (810, 452)
# -> (800, 450) at 12: F1 = 1. The epsilons of evaluation.py kept.
def f1(tp, fp, fn):
    p, r = tp / (tp + fp + 1e-8), tp / (tp + fn + 1e-8)
    return 2 * p * r / (p + r + 1e-8)


MATCH_F1 = 100 * (f1(1, 1, 1) + f1(1, 0, 0)) / 2
MATCH = (MATCH_F1 + (GRADES["s1_f1_0"] + GRADES["s1_f2_0"]) / 2) / 2
CHATGPT = (GRADES["s1_f1_3"] + GRADES["s1_f2_2"]) / 2
# Accuracy (tag 0): "B" (= reference) and "Yes" (reference "Yes."); s1_f1_2 is skipped because its
# object (500, 300) was not matched in the frame's first answer. Parser: 2/2; string equality: 1/2.
FINAL = 0.4 * CHATGPT / 100 + 0.2 * LANGUAGE + 0.2 * MATCH / 100 + 0.2 * 1.0


@needs_java
def test_drivelm_scores_equal_the_hand_computation():
    questions = ch.drivelm_questions(load_reference(FIX / "drivelm_test.json"))
    # Submission ids follow perception, prediction, planning, behavior, whatever the file's order (f2).
    assert [q.challenge_id for q in questions if q.frame == "f2"] == ["s1_f2_0", "s1_f2_1", "s1_f2_2", "s1_f2_3"]
    assert [q.category for q in questions if q.frame == "f2"] == ["perception", "prediction", "planning", "behavior"]
    r = ch.score_drivelm(questions, drivelm_answers(), fixture_grader)
    assert r["skipped_by_graph"]["ids"] == ["s1_f1_2"] and r["n_scored"] == 8
    assert r["accuracy"]["value"] == 1.0 and r["accuracy"]["exact"] == 0.5
    m = r["language"]["metrics"]
    assert list(m) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"):
        assert m[k] == pytest.approx(BLEU, abs=1e-8)
    assert m["ROUGE_L"] == pytest.approx(ROUGE, abs=1e-9)
    assert m["CIDEr"] == pytest.approx(CIDER, abs=1e-9)
    assert r["language"]["score"] == pytest.approx(LANGUAGE, abs=1e-8)
    assert r["match"]["f1"] == pytest.approx(MATCH_F1, abs=1e-9)
    assert r["match"]["value"] == pytest.approx(MATCH, abs=1e-9)
    assert r["chatgpt"]["value"] == CHATGPT
    assert r["final"] == pytest.approx(FINAL, abs=1e-8) and not r["partial"] and r["missing"] == []
    assert r["final_exact_accuracy"] == pytest.approx(FINAL - 0.2 * 0.5, abs=1e-8)


@needs_java
def test_drivelm_without_judge_is_partial_naming_the_missing_parts():
    questions = ch.drivelm_questions(load_reference(FIX / "drivelm_test.json"))
    r = ch.score_drivelm(questions, drivelm_answers(), grader=None)
    assert r["final"] is None and r["partial"]
    assert r["chatgpt"]["value"] is None and r["match"]["value"] is None
    assert r["match"]["f1"] == pytest.approx(MATCH_F1, abs=1e-9)  # the judge-free half is still reported
    assert any("chatgpt" in m and "--judge-url" in m for m in r["missing"])
    # Not renormalised over what is present: only the language and accuracy terms, at their weights.
    assert r["final_partial"] == pytest.approx(0.2 * LANGUAGE + 0.2 * 1.0, abs=1e-8)


def test_match_rule_threshold_greedy_and_what_is_read():
    ref = "<c1,CAM_FRONT,100.0,100.0> and <c2,CAM_FRONT,110.0,100.0>"
    assert ch.match_f1("<c1,CAM_FRONT,110.0,105.9>", "<c1,CAM_FRONT,100.0,100.0>")[1] == pytest.approx(f1(1, 0, 0))  # L1 15.9
    assert ch.match_f1("<c1,CAM_FRONT,110.0,106.0>", "<c1,CAM_FRONT,100.0,100.0>")[1] == pytest.approx(0, abs=1e-6)  # 16: no
    # Greedy in prediction order: the first point takes its nearest reference, the second the one left.
    matched, score = ch.match_f1("(104.0, 100.0) then (104.5, 100.0)", ref)
    assert matched == [(100.0, 100.0), (110.0, 100.0)] and score == pytest.approx(f1(2, 0, 0))
    assert ch.coordinates("<c1,CAM_FRONT,800,450>") == []  # integers are not read (\d+\.\d+ only)
    assert ch.coordinates("1.0 2.0 3.0") == [(1.0, 2.0)]  # an odd last number is dropped in predictions
    with pytest.raises(DataError, match="odd number"):
        ch.match_f1("", "1.0 2.0 3.0", what="reference answer of s_f_0")


@needs_java
def test_language_metrics_reference_values():
    from drivekd.eval.language import coco_scores

    # BLEU on one pair, by hand: "the cat sat on the mat" vs "the cat is on the mat" (PTB-tokenized).
    # Clipped precisions 5/6, 3/5, 1/4, 0/3; equal lengths (no brevity penalty). pycocoevalcap adds
    # 1e-15 / 1e-9 to counts, so BLEU-4 is ~0 instead of a log of zero.
    m = coco_scores(["The cat sat on the mat."], ["The cat is on the mat."])
    assert m["Bleu_1"] == pytest.approx(5 / 6, abs=1e-8)
    assert m["Bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-8)
    assert m["Bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-8)
    assert m["Bleu_4"] < 1e-3
    assert m["ROUGE_L"] == pytest.approx(5 / 6, abs=1e-9)  # LCS 5 of 6 both ways: P = R = F
    assert m["CIDEr"] == 0.0  # one reference: every n-gram's idf is log(1) - log(1) = 0
    # CIDEr-D of predictions equal to their references (no n-gram shared between the two) is 10, its
    # maximum; a text too short for 4-grams has no 4-gram vector, and that n scores 0: 10 x 3/4.
    same = ["a red car turns left", "two buses stop here"]
    assert coco_scores(same, same)["CIDEr"] == pytest.approx(10.0)
    assert coco_scores(["a red car", "two buses stop here"], ["a red car", "two buses stop here"])["CIDEr"] == pytest.approx((7.5 + 10) / 2)


def test_robosense_kinds():
    opts = " Please select the correct answer from the following options: A. Go. B. Stop."
    assert ch.robosense_kind("Which?" + opts, "B") == "MCQ"
    assert ch.robosense_kind("Would <c1,CAM_BACK,1.0,2.0> move?", "Yes.") == "MCQ"
    assert ch.robosense_kind("What is <c1,CAM_BACK,1.0,2.0>?", "A car.") == "VQA_obj"
    assert ch.robosense_kind("What is important?", "A") == "VQA_scene"  # a letter without listed options


def robosense_records():
    from drivekd.eval.formats import join_robosense

    fmt, entries = read_submission(FIX / "robosense_results.json")
    assert fmt == "robosense"
    records = join_robosense(FIX / "robosense_results.json", entries, load_reference(FIX / "robosense_ref.json"))
    return records, {records[i]["id"]: g for i, g in zip((1, 2, 5, 6), (60.0, 50.0, 90.0, 70.0))}


def test_robosense_phase1_equals_the_hand_computation():
    records, grades = robosense_records()
    r = ch.score_robosense(records, grades, language=False)
    # 3 MCQ (B. Stopped. = B: right; "No, it would not." vs Yes.: wrong; "I am not sure.": unanswerable),
    # 4 VQA graded 60, 50, 90, 70.
    assert (r["n_mcq"], r["n_vqa"]) == (3, 4)
    assert r["mcq_accuracy"] == pytest.approx(100 / 3)
    assert r["unanswerable"]["count"] == 1
    assert r["vqa_llm_score"] == 67.5
    assert r["phase1"] == pytest.approx((100 + 4 * 67.5) / 7)
    assert r["phase2"] is None and any("METEOR" in m for m in r["missing"])
    assert r["breakdown"]["perception"] == {"MCQ": {"n": 1, "accuracy": 100.0}, "VQA_obj": {"n": 1, "llm_score": 60.0},
                                            "VQA_scene": {"n": 1, "llm_score": 50.0}}
    assert r["breakdown"]["prediction"]["MCQ"] == {"n": 2, "accuracy": 0.0}
    # Without a judge: no phase score; what is there (the MCQ part) reported apart, not renormalised.
    r = ch.score_robosense(records, None, language=False)
    assert r["phase1"] is None and r["partial"] and any("LLM score" in m for m in r["missing"])
    assert r["phase1_partial"] == pytest.approx(100 / 7)


@pytest.mark.slow  # METEOR's JVM loads its paraphrase table: ~20 s on a busy 2-core machine
@needs_java
def test_robosense_phase2_equals_the_hand_computation():
    records, grades = robosense_records()
    r = ch.score_robosense(records, grades)
    # ROUGE-L of the VQA pairs: "a white car" vs "a white sedan" (LCS 2 of 3: 2/3), two identical (1),
    # "slow down" vs "keep going at the same speed" (0).
    assert r["vqa_rouge_l"] == pytest.approx(100 * (2 / 3 + 1 + 1 + 0) / 4, abs=1e-7)
    assert 0 < r["vqa_meteor"] < 100
    assert r["phase2"] == pytest.approx((100 + 4 * (0.1 * r["vqa_rouge_l"] + 0.1 * r["vqa_meteor"] + 0.8 * 67.5)) / 7)


# ------------------------------------------------------------------------------ files and errors


def test_layouts_detected_and_submission_json_read():
    assert read_submission(FIX / "drivelm_output.json")[0] == "drivelm"
    fmt, entries = read_submission(FIX / "drivelm_submission.json")
    assert fmt == "drivelm" and len(entries) == 9
    assert read_submission(FIX / "robosense_results.json")[0] == "robosense"


@pytest.mark.parametrize("name, fmt, expected", [
    ("drivelm_output_malformed.json", "auto",
     ["3 malformed drivelm record(s)", "record 1, field `id`: missing", "record 2, field `answer`: is a number 3",
      "record 3 is a string"]),
    ("robosense_results_malformed.json", "auto",
     ["record 1, field `category`: missing", "record 2, field `question`: is a list ['not', 'text']"]),
])
def test_malformed_predictions_name_file_record_and_field(name, fmt, expected):
    with pytest.raises(DataError) as e:
        read_submission(FIX / name, fmt)
    assert name in str(e.value)
    for text in expected:
        assert text in str(e.value)


def test_unmatched_and_missing_answers_are_named(tmp_path):
    from drivekd.eval.formats import join_robosense

    entries = json.loads((FIX / "robosense_results.json").read_text())
    entries[3]["question"] = "A question nobody asked?"
    with pytest.raises(DataError, match=r"record 3 .*'A question nobody asked\?' is not in the reference"):
        join_robosense(tmp_path / "results.json", entries, load_reference(FIX / "robosense_ref.json"))
    questions = ch.drivelm_questions(load_reference(FIX / "drivelm_test.json"))
    answers = drivelm_answers()
    del answers["s1_f2_2"]
    with pytest.raises(DataError, match="no answer for question 's1_f2_2'"):
        ch.score_drivelm(questions, answers, language=False)
    with pytest.raises(DataError, match="'s9_f9_0'"):
        ch.score_drivelm(questions, {**drivelm_answers(), "s9_f9_0": "x"}, language=False)


def test_score_cli_needs_data_for_a_submission():
    r = CliRunner().invoke(main, ["score", str(FIX / "drivelm_output.json")])
    assert r.exit_code == 2 and "--data" in r.output and "no reference answers" in r.output


# --------------------------------------------------------------------------------- round trips


def drivelm_judge(server, body):
    """The DriveLM prompt: reply with a bare number, chosen by the prediction in the prompt."""
    text = body["messages"][-1]["content"]
    pred = text.rsplit("My answer: ", 1)[1]
    by_pred = {e["answer"]: GRADES[e["id"]] for e in json.loads((FIX / "drivelm_output.json").read_text()) if e["id"] in GRADES}
    return reply(f"{by_pred[pred]:.0f}")


@needs_java
def test_cli_scores_a_drivelm_submission_with_the_judge(tmp_path):
    out = tmp_path / "scored"
    with JudgeServer(drivelm_judge) as server:
        r = CliRunner().invoke(main, ["score", str(FIX / "drivelm_submission.json"), "--data", str(FIX / "drivelm_test.json"),
                                      "--out", str(out), "--judge-url", server.url, "--judge-model", "m", "--judge-runs", "1",
                                      "--judge-workers", "1"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "challenge.json").read_text())
    assert result["final"] == pytest.approx(FINAL, abs=1e-8)
    assert {b["temperature"] for _, _, b in server.requests} == {ch.DRIVELM_JUDGE_TEMPERATURE}  # the challenge's
    assert len(server.requests) == 4  # tag 1 and tag 3 only, skipped questions not graded
    assert "DriveLM final 0.7605" in r.output
    prov = json.loads((out / "report.json").read_text())["provenance"]
    assert prov["predictions"]["format"] == "drivelm" and prov["reference"]["path"].endswith("drivelm_test.json")
    assert (out / "challenge.md").is_file()


def test_cli_without_judge_reports_partial(tmp_path):
    r = CliRunner().invoke(main, ["score", str(FIX / "robosense_results.json"), "--data", str(FIX / "robosense_ref.json"),
                                  "--out", str(tmp_path), "--no-language"])
    assert r.exit_code == 0, r.output
    assert "partial: missing LLM score" in r.output
    md = (tmp_path / "challenge.md").read_text()
    assert "**Partial**" in md and "not renormalised" in md


@pytest.mark.parametrize("source, fmt", [("drivelm_test.json", "drivelm"), ("drivelm_test.json", "robosense"),
                                         ("robosense_ref.json", "robosense")])
def test_round_trip_load_predict_export_score(tmp_path, source, fmt):
    """load -> predictions (the references themselves) -> export in the layout -> read back and score."""
    samples = load_reference(FIX / source)
    preds = {s.id: s.answer for s in samples}
    path = export_predictions(fmt, samples, preds, tmp_path)
    assert path.name == {"drivelm": "output.json", "robosense": "results.json"}[fmt]
    assert read_submission(path)[0] == fmt  # detected from its shape
    report = score_submission(path, tmp_path / "scored", data=FIX / source, language=False)
    result = report["challenge"]
    if fmt == "drivelm":
        assert [e["id"] for e in json.loads(path.read_text())][:2] == ["s1_f1_0", "s1_f1_1"]
        assert result["accuracy"]["value"] == 1.0 and result["accuracy"]["exact"] == 1.0
        assert result["match"]["f1"] == pytest.approx(100 * f1(2, 0, 0) / 2 + 100 * f1(1, 0, 0) / 2)
        assert result["skipped_by_graph"]["count"] == 0
    else:
        entries = json.loads(path.read_text())
        assert set(entries[0]) >= {"scene_token", "frame_token", "question", "answer", "category", "img_paths"}
        mcq = [s for s in samples if ch.robosense_kind(ch.question_fields(s)[3], s.answer) == "MCQ"]
        assert result["mcq_accuracy"] == 100.0 and result["n_mcq"] == len(mcq)
    # The DriveBench-style report of the same predictions, keyed by drivekd's sample ids.
    assert report["n_records"] == len(samples)


def test_drivebench_round_trip_and_predictions_json_never_read_as_a_submission(demo_data, tmp_path):
    from drivekd.eval.generate import drivebench_record
    from drivekd.eval.predictions import write_predictions

    samples = load_reference(demo_data / "drivebench.json")
    records = [{**drivebench_record(s), "pred": s.answer} for s in samples]
    path = write_predictions(tmp_path / "predictions.json", records)
    assert export_predictions("drivebench", samples, {}, tmp_path) == path  # its own layout: already written
    report = score_submission(path, tmp_path / "scored")
    assert read_submission(path)[0] == "drivebench" and "challenge" not in report
    mcq = [c for c in report["capabilities"].values() if c["mcq_total"]]
    assert mcq and all(c["mcq_accuracy"] == 100.0 for c in mcq)
    # A predictions.json of DriveLM samples read as a DriveLM submission would score references against
    # themselves: refused, pointing at output.json.
    lm = load_reference(FIX / "drivelm_test.json")
    write_predictions(tmp_path / "lm.json", [{**drivebench_record(s), "pred": "x"} for s in lm])
    with pytest.raises(DataError, match="output.json"):
        read_submission(tmp_path / "lm.json", "drivelm")


@pytest.mark.parametrize("data, fmt, message", [
    ("drivebench", "robosense", "needs DriveLM or RoboSense data"),
    ("robosense_ref.json", "drivelm", "has none (a RoboSense file)"),
])
def test_format_the_data_cannot_take_is_refused_before_the_model_loads(demo_data, tmp_path, data, fmt, message):
    from PIL import Image

    for frame in ("f1", "f2"):
        for cam in ("CAM_FRONT", "CAM_BACK"):
            (tmp_path / "samples" / cam).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12)).save(tmp_path / "samples" / cam / f"{frame}.png")
    path, images = (demo_data / "drivebench.json", demo_data) if data == "drivebench" else (FIX / data, tmp_path)
    (tmp_path / "model").mkdir()  # not a checkpoint: the refusal must come first
    r = CliRunner().invoke(main, ["--model", str(tmp_path / "model"), "--data", str(path), "--out", str(tmp_path / "out"),
                                  "--format", fmt, "--images", str(images)])
    assert r.exit_code == 2 and message in r.output and f"--format {fmt}" in r.output


def test_cli_scores_robosense_with_the_drivebench_rubrics(tmp_path):
    out = tmp_path / "scored"
    with JudgeServer(lambda server, body: reply("1. Action alignment: 20\nTotal Score: 70")) as server:
        r = CliRunner().invoke(main, ["score", str(FIX / "robosense_results.json"), "--data", str(FIX / "robosense_ref.json"),
                                      "--out", str(out), "--judge-url", server.url, "--judge-model", "m", "--judge-runs", "2",
                                      "--judge-workers", "1", "--no-language"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "challenge.json").read_text())
    assert result["vqa_llm_score"] == 70.0 and result["phase1"] == pytest.approx((100 + 4 * 70) / 7)
    assert len(server.requests) == 4 * 2  # the open questions only, --judge-runs times
    assert {b["temperature"] for _, _, b in server.requests} == {0.0}  # DriveBench's, the track's base
    assert all("Total Score" in b["messages"][-1]["content"] for _, _, b in server.requests)


def test_drivelm_limit_run_skips_unanswered_questions_and_counts_them():
    questions = ch.drivelm_questions(load_reference(FIX / "drivelm_test.json"))
    answers = {k: v for k, v in drivelm_answers().items() if k.startswith("s1_f1_")}  # frame f2 not generated
    r = ch.score_drivelm(questions, answers, fixture_grader, language=False, missing="skip")
    assert r["unanswered"]["ids"] == ["s1_f2_0", "s1_f2_1", "s1_f2_2", "s1_f2_3"]
    assert r["chatgpt"]["value"] == GRADES["s1_f1_3"] and r["match"]["f1"] == pytest.approx(100 * f1(1, 1, 1))
