"""Scores from prediction records: accuracy, unanswerable ids, judge statistics, consistency."""

import itertools
import re
import statistics

import numpy as np
import pytest

from drivekd.errors import DataError
from drivekd.eval.score import (
    average_ranks,
    capability_of,
    group_key,
    is_mcq,
    pearson,
    record_id,
    score_predictions,
    spearman,
)

OPTS = " Please select the correct answer from the following options: A. Going ahead. B. Turn right. C. Turn left. D. Stopped."


_COUNTER = itertools.count()


def rec(frame, qtype, answer, pred, tag=0, question=None, **extra):
    """A DriveBench record with its prediction; questions are unique unless given."""
    return {
        "scene_token": "s1",
        "frame_token": frame,
        "question_type": qtype,
        "question": question or f"{qtype} question {next(_COUNTER)} about {frame}?{OPTS if tag == 0 else ''}",
        "answer": answer,
        "tag": [tag],
        "image_path": {"CAM_FRONT": f"samples/CAM_FRONT/{frame}.jpg"},
        "pred": pred,
        **extra,
    }


def test_capability_of():
    assert capability_of("perception") == "perception"
    assert capability_of("prediction") == "reasoning"
    assert capability_of("behavior") == "reasoning"
    assert capability_of("Planning") == "planning"
    with pytest.raises(DataError, match="unknown question_type 'weather'"):
        capability_of("weather")


def test_record_id():
    a = rec("f1", "perception", "A", "A", question="What is it?")
    assert record_id({**a, "id": "q7"}) == "q7"
    rid = record_id(a)
    assert rid.startswith("f1-") and re.fullmatch(r"[A-Za-z0-9._-]+", rid)
    assert record_id(dict(a)) == rid  # stable
    assert record_id({**a, "question": "What else?"}) != rid


def test_record_id_is_the_sample_id(tmp_path):
    """Predictions, the store and the training run name a record alike: the scorer's id of a
    record is the id the data loader gives the same record (explicit, derived, unsafe ids)."""
    import json

    from drivekd.data import load_samples

    recs = [rec("f1", "perception", "A", "A", question="<image>What is it?"),
            rec("f/2 ..", "planning", "B", "B", question="Where to?"),
            rec("f3", "behavior", "C", "C", id="my id/with spaces"),
            rec("f4", "prediction", "D", "D", id=17)]
    for r in recs:
        r["image_path"] = {"CAM_FRONT": "a.jpg"}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(recs))
    samples = load_samples(path, tmp_path, check_images=False)
    assert [record_id(r) for r in recs] == [s.id for s in samples]


def test_group_key():
    assert group_key(rec("f1", "planning", "A", "A")) == "f1"
    no_frame = {"image_path": {"CAM_FRONT": "a.jpg", "CAM_BACK": "b.jpg"}}
    assert group_key(no_frame) == "a.jpg|b.jpg"
    assert group_key({"images": ["x.jpg"]}) == "x.jpg"
    assert group_key({}) is None


def test_is_mcq():
    assert is_mcq(rec("f", "perception", "A", "A"))
    assert is_mcq({"answer": "C", "tag": [2]})  # a single-letter answer
    assert not is_mcq(rec("f", "planning", "Keep going.", "Go", tag=1))


def test_average_ranks_ties():
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(average_ranks([5, 5, 5]), [2, 2, 2])
    np.testing.assert_array_equal(average_ranks([3, 1, 2]), [3, 1, 2])


def test_correlation_properties():
    x = [1.0, 2.0, 3.0, 4.0]
    assert pearson(x, x) == pytest.approx(1.0)
    assert pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, [2.0 * v + 1 for v in x]) == pytest.approx(pearson([2.0 * v + 1 for v in x], x))  # symmetric
    assert pearson([1.0, 2.0], [1.0, 2.0]) is None  # fewer than 3 points
    assert pearson(x, [5.0] * 4) is None  # zero variance
    assert spearman(x, [5.0] * 4) is None


def test_accuracy_and_unanswerable():
    records = [
        rec("f1", "perception", "A", "Answer: A"),
        rec("f1", "perception", "B", "There is a car in front of the ego vehicle."),  # unanswerable
        rec("f2", "perception", "C", "C. Turn left."),
        rec("f2", "perception", "A", "B"),
        rec("f2", "perception", "The car is moving.", "It moves.", tag=2),  # open: not in accuracy
        rec("f1", "behavior", "D", "Final: D. Support: a truck is ahead."),
        rec("f1", "prediction", "B", "a", id="p-lower-a"),  # bare "a": unanswerable
        rec("f2", "planning", "A", "(A)"),
    ]
    report = score_predictions(records)
    caps = report["capabilities"]
    assert caps["perception"]["mcq_total"] == 4 and caps["perception"]["mcq_correct"] == 2
    assert caps["perception"]["mcq_accuracy"] == pytest.approx(50.0)
    assert caps["perception"]["n_questions"] == 5
    assert caps["perception"]["unanswerable"] == 1
    assert caps["reasoning"]["mcq_accuracy"] == pytest.approx(50.0)
    assert caps["planning"]["mcq_accuracy"] == pytest.approx(100.0)
    assert report["score_definition"] == "mcq_accuracy"
    assert report["average"] == pytest.approx((50 + 50 + 100) / 3)
    assert report["table1"]["average"] == report["average"]
    assert report["unanswerable"]["count"] == 2
    assert report["unanswerable"]["ids"] == [record_id(records[1]), "p-lower-a"]
    qt = report["question_types"]
    assert set(qt) == {"perception", "behavior", "prediction", "planning"}
    assert qt["behavior"]["mcq_accuracy"] == 100.0 and qt["prediction"]["mcq_accuracy"] == 0.0
    assert qt["prediction"]["capability"] == "reasoning"


def test_no_planning_mcq_means_no_planning_score_without_judge():
    records = [rec("f1", "perception", "A", "A"), rec("f1", "planning", "Go ahead.", "Go.", tag=1)]
    report = score_predictions(records)
    assert report["capabilities"]["planning"]["score"] is None
    assert report["average"] is None


def test_yes_no_multiple_choice():
    records = [
        rec("f1", "prediction", "Yes.", "Yes, it will cross.", question="Will it cross?"),
        rec("f2", "prediction", "No.", "Yes.", question="Will it stop?"),
    ]
    report = score_predictions(records)
    assert report["capabilities"]["reasoning"]["mcq_accuracy"] == 50.0


def test_judge_statistics_and_scores():
    records = [
        rec("f1", "perception", "A", "A", id="p1"),
        rec("f1", "perception", "Car ahead.", "A car.", tag=2, id="p2"),
        rec("f1", "behavior", "B", "B", id="r1"),
        rec("f1", "planning", "Keep going.", "Go.", tag=1, id="l1"),
    ]
    grades = {
        "p1": [70, 80, 90],
        "p2": [50, 50, 60],
        "r1": [10, 20, 30],
        "l1": [73, 74, 75.5],
    }
    report = score_predictions(records, grades)
    assert report["score_definition"] == "judge_mean"
    per_run = [(70 + 50) / 2, (80 + 50) / 2, (90 + 60) / 2]
    j = report["judge"]["per_capability"]["perception"]
    assert j["mean"] == pytest.approx(statistics.mean(per_run))
    assert j["std"] == pytest.approx(statistics.stdev(per_run))  # ddof=1
    assert report["judge"]["runs"] == 3
    assert report["capabilities"]["perception"]["score"] == pytest.approx(statistics.mean(per_run))
    assert report["capabilities"]["planning"]["score"] == pytest.approx(statistics.mean([73, 74, 75.5]))
    assert report["capabilities"]["planning"]["judge_coverage"] == "1/1"
    assert report["average"] == pytest.approx(np.mean([statistics.mean(per_run), 20.0, statistics.mean([73, 74, 75.5])]))
    # MCQ accuracy is still reported next to the judge score
    assert report["capabilities"]["perception"]["mcq_accuracy"] == 100.0


def test_consistency_prefers_judge_grades_and_skips_ungraded_open_questions():
    records = []
    grades = {}
    reasoning = {"f1": 10.0, "f2": 40.0, "f3": 30.0, "f4": 90.0}
    planning = {"f1": 20.0, "f2": 50.0, "f3": 80.0, "f4": 70.0}
    for frame in reasoning:
        records.append(rec(frame, "prediction", "It stops.", "It stops.", tag=3, id=f"{frame}-r"))
        records.append(rec(frame, "planning", "Brake.", "Brake.", tag=1, id=f"{frame}-l"))
        grades[f"{frame}-r"] = [reasoning[frame]]
        grades[f"{frame}-l"] = [planning[frame]]
    # an ungraded open planning question would drag f1 to... nothing: it is left out
    records.append(rec("f1", "planning", "Slow down.", "Speed up.", tag=1, id="f1-ungraded"))
    # a frame with only reasoning does not count
    records.append(rec("f5", "behavior", "A", "A", id="f5-r"))
    report = score_predictions(records, grades)
    cons = report["consistency"]
    assert cons["n_groups"] == 4
    r, p = list(reasoning.values()), list(planning.values())
    assert cons["pearson"] == pytest.approx(np.corrcoef(r, p)[0, 1])
    assert cons["spearman"] == pytest.approx(np.corrcoef([1, 3, 2, 4], [1, 2, 4, 3])[0, 1])


def test_consistency_needs_three_groups():
    records = [
        rec("f1", "behavior", "A", "A"), rec("f1", "planning", "A", "B"),
        rec("f2", "behavior", "A", "B"), rec("f2", "planning", "A", "A"),
    ]
    cons = score_predictions(records)["consistency"]
    assert cons["n_groups"] == 2 and cons["pearson"] is None and cons["spearman"] is None


def test_records_sharing_an_id_are_each_scored():
    same_question = dict(question="Which way?" + OPTS)
    records = [rec("f1", "perception", "A", "A", **same_question), rec("f1", "perception", "B", "C", **same_question)]
    assert record_id(records[0]) == record_id(records[1])
    report = score_predictions(records)
    assert report["capabilities"]["perception"]["mcq_total"] == 2
    assert report["capabilities"]["perception"]["mcq_correct"] == 1
    with pytest.raises(DataError, match="share the id"):  # judge grades could not be told apart
        score_predictions(records, {record_id(records[0]): [50.0]})


def test_bad_records_are_named():
    good = rec("f1", "perception", "A", "A", id="ok")
    with pytest.raises(DataError, match="id bad.*no 'pred'"):
        score_predictions([good, {k: v for k, v in rec("f1", "perception", "A", "A", id="bad").items() if k != "pred"}])
    with pytest.raises(DataError, match="unknown question_type"):
        score_predictions([{**good, "question_type": "weather"}])
    with pytest.raises(DataError, match="empty"):
        score_predictions([])


# ----------------------------------------------------------------------------- malformed records (issue 11)


def test_pred_of_wrong_type_is_named_not_a_traceback():
    good = rec("f1", "perception", "A", "A", id="ok")
    with pytest.raises(DataError, match=r"record 1 \(id num\): 'pred' must be a string, got int 3"):
        score_predictions([good, rec("f1", "perception", "A", 3, id="num")])


def test_record_without_answer_is_refused_not_dropped_from_the_denominator():
    records = [rec("f1", "perception", "A", "A", id="ok"), {k: v for k, v in rec("f2", "perception", "B", "A", id="noans").items() if k != "answer"}]
    with pytest.raises(DataError, match=r"record 1 \(id noans\) has no 'answer' field"):
        score_predictions(records)


def test_cli_lists_every_malformed_record_with_the_file(tmp_path):
    from click.testing import CliRunner

    from drivekd.cli.eval import main as eval_cli

    records = [rec("f1", "perception", "A", "A", id="ok"), rec("f2", 7, "A", "A", id="seven"),
               rec("f3", "planning", "A", None, id="nopred", tag=1), rec("f4", "weather", "A", "A", id="sky")]
    path = tmp_path / "predictions.json"
    path.write_text(__import__("json").dumps(records))
    r = CliRunner().invoke(eval_cli, ["score", str(path), "--out", str(tmp_path / "report")])
    assert r.exit_code == 2 and str(path) in r.output and "Traceback" not in r.output, r.output
    for needle in ("record 1 (id seven): 'question_type' must be a string, got int 7", "record 2 (id nopred): 'pred' must be a string",
                   "record 3 (id sky): unknown question_type 'weather'", "3 malformed"):
        assert needle in r.output, r.output
    assert not (tmp_path / "report" / "report.json").exists()


def test_judge_timeout_flag_bounds_each_request(tmp_path, monkeypatch):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from click.testing import CliRunner

    from drivekd.cli.eval import main as eval_cli

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(30)  # longer than the timeout: the client must give up first

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([rec("f1", "perception", "A", "A", id="ok")]))
    try:
        r = CliRunner().invoke(eval_cli, ["score", str(path), "--judge-url", f"http://127.0.0.1:{httpd.server_port}/v1", "--judge-model", "m",
                                          "--judge-runs", "1", "--judge-retries", "0", "--judge-timeout", "0.5"])
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()  # else its socket is left to the garbage collector (a ResourceWarning, an error here)
    assert r.exit_code == 2 and "timed out" in r.output, r.output
    r = CliRunner().invoke(eval_cli, ["score", str(path), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-timeout", "0"])
    assert r.exit_code == 2 and "--judge-timeout must be > 0" in r.output


@pytest.mark.parametrize("answer, why", [("", "is empty"), ("the red car", "names no option")])
def test_mcq_reference_that_names_no_option_is_malformed(answer, why):
    # Once such a record left the multiple-choice denominator silently (3 of 4 counted, 100.00 shown).
    records = [rec(f"f{i}", "perception", "A", "A") for i in range(3)] + [rec("f9", "perception", answer, "A")]
    with pytest.raises(DataError, match=rf"record 3 .*multiple-choice \(tag 0\) 'answer'.*{why}"):
        score_predictions(records)
    assert score_predictions(records[:3])["capabilities"]["perception"]["mcq_total"] == 3
