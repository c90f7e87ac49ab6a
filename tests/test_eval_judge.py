"""The LLM judge against a small local chat-completions server (127.0.0.1, no network)."""

import json
import socket
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from drivekd.cli.eval import main
from drivekd.eval.judge import (
    RUBRICS,
    JudgeClient,
    JudgeError,
    build_messages,
    chat_completions_url,
    grade_records,
    parse_total_score,
    rubric_for,
)
from drivekd.eval.score import score_predictions

SECRET = "sk-test-DO-NOT-LEAK-0123456789"
KEY_ENV = "DRIVEKD_TEST_JUDGE_KEY"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours *_proxy variables; the local server must be reached directly."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


class JudgeServer:
    """A chat-completions endpoint whose reply comes from `respond(server, body) -> (status, bytes)`."""

    def __init__(self, respond):
        self.respond = respond
        self.requests = []  # (path, headers, body)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                super().setup()  # no Nagle: headers and body go out at once (no 40 ms ACK stalls)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    status, payload = outer.respond(outer, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(text):
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def sheet(score):
    return f"1. Answer correctness (50 points): 50\n2. Object recognition: 8\nTotal Score: {score}"


RECORDS = [
    {"id": "p1", "frame_token": "f1", "question_type": "perception", "question": "What is at <c1,CAM_FRONT,0.5,0.5>? A. car B. bus", "answer": "A", "tag": [0], "pred": "PRED-p1"},
    {"id": "p2", "frame_token": "f1", "question_type": "perception", "question": "What is the ego car doing?", "answer": "Going straight.", "tag": [2], "pred": "PRED-p2"},
    {"id": "r1", "frame_token": "f1", "question_type": "behavior", "question": "Predict the behaviour. A. left B. right", "answer": "B", "tag": [0], "pred": "PRED-r1"},
    {"id": "l1", "frame_token": "f1", "question_type": "planning", "question": "What should the ego vehicle do?", "answer": "Keep going.", "tag": [1], "pred": "PRED-l1"},
]
GRADES = {  # per record, per run
    "p1": [70, 80, 90, 60, 75],
    "p2": [50, 50, 60, 40, 55.5],
    "r1": [10, 20, 30, 40, 50],
    "l1": [73, 73, 74, 72, 73],
}


def by_prediction(server, body):
    """Grade from the prediction named in the prompt, in the order its runs arrive."""
    text = body["messages"][-1]["content"]
    rid = next(r for r in GRADES if f"PRED-{r}" in text)
    counts = server.__dict__.setdefault("counts", {})
    counts[rid] = counts.get(rid, 0) + 1
    return reply(sheet(GRADES[rid][counts[rid] - 1]))


def client(url, **kw):
    return JudgeClient(url, "judge-model", key_env=KEY_ENV, base_delay=0.01, **kw)


def test_parse_total_score():
    assert parse_total_score("Total Score: 73") == 73.0
    assert parse_total_score("criteria...\nTotal Score: 5\nsummary\nTotal Score: 61.5") == 61.5  # last one
    assert parse_total_score("**Total Score:** 88") == 88.0
    assert parse_total_score("total score = 40") == 40.0
    assert parse_total_score("Score: 73") is None
    assert parse_total_score("Total Score: 130") is None  # outside 0-100
    assert parse_total_score("") is None


def test_chat_completions_url():
    assert chat_completions_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


def test_rubrics():
    assert [rubric_for(r) for r in RECORDS] == ["perception_mcq", "perception_vqa", "behavior_mcq", "planning_vqa"]
    assert rubric_for({"question_type": "prediction", "tag": [3], "answer": "It stops."}) == "prediction_vqa"
    assert all(sum(c.points for c in r.criteria) == 100 for r in RUBRICS.values())
    prompt = build_messages(RECORDS[3], "planning_vqa")[-1]["content"]
    for needle in ("Action prediction accuracy (40 points)", "Conciseness (10 points)", RECORDS[3]["question"],
                   "Keep going.", "PRED-l1", "Total Score: N"):
        assert needle in prompt


def test_five_runs_give_exact_mean_and_std(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    log = tmp_path / "judge.jsonl"
    with JudgeServer(by_prediction) as server:
        grades = grade_records(RECORDS, client(server.url), runs=5, log_path=log)
    assert grades == {rid: [float(g) for g in gs] for rid, gs in GRADES.items()}
    assert len(server.requests) == 20
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"
    assert headers["Authorization"] == f"Bearer {SECRET}"

    report = score_predictions(RECORDS, grades)
    per_run = [(a + b) / 2 for a, b in zip(GRADES["p1"], GRADES["p2"])]
    perception = report["judge"]["per_capability"]["perception"]
    assert perception["mean"] == pytest.approx(statistics.mean(per_run))
    assert perception["std"] == pytest.approx(statistics.stdev(per_run))
    planning = report["judge"]["per_capability"]["planning"]
    assert planning["mean"] == pytest.approx(statistics.mean(GRADES["l1"]))
    assert planning["std"] == pytest.approx(statistics.stdev(GRADES["l1"]))

    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 20
    assert {(e["id"], e["run"]) for e in entries} == {(r, k) for r in GRADES for k in range(5)}
    assert set(entries[0]) >= {"id", "run", "rubric", "raw", "grade", "time"}
    assert SECRET not in log.read_text()

    # a second call with the same log resumes: nothing is asked again
    with JudgeServer(by_prediction) as again:
        assert grade_records(RECORDS, client(again.url), runs=5, log_path=log) == grades
    assert again.requests == []


def test_503_twice_then_success(tmp_path):
    def flaky(server, body):
        if len(server.requests) <= 2:
            return 503, b'{"error": "overloaded"}'
        return reply("Total Score: 64")

    with JudgeServer(flaky) as server:
        grades = grade_records(RECORDS[:1], client(server.url, retries=3), runs=1)
    assert grades == {"p1": [64.0]}
    assert len(server.requests) == 3


def test_missing_total_score_is_retried(tmp_path):
    def forgetful(server, body):
        return reply("Looks fine." if len(server.requests) == 1 else "Total Score: 12")

    log = tmp_path / "judge.jsonl"
    with JudgeServer(forgetful) as server:
        assert grade_records(RECORDS[:1], client(server.url), runs=1, log_path=log) == {"p1": [12.0]}
    grades_logged = [json.loads(line)["grade"] for line in log.read_text().splitlines()]
    assert grades_logged == [None, 12.0]  # the failed answer is logged too


def test_garbage_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def garbage(server, body):  # not JSON; echoes the key to check it is scrubbed
        return 200, f"<html>oops {SECRET}</html>".encode()

    with JudgeServer(garbage) as server:
        with pytest.raises(JudgeError) as err:
            grade_records(RECORDS[:1], client(server.url, retries=2), runs=1)
    assert len(server.requests) == 3
    message = str(err.value)
    assert server.url + "/chat/completions" in message and "not a chat-completions JSON reply" in message
    assert SECRET not in message


def test_never_a_total_score_is_a_clear_error():
    with JudgeServer(lambda server, body: reply("I cannot grade this.")) as server:
        with pytest.raises(JudgeError, match="without a 'Total Score: N' line"):
            grade_records(RECORDS[:1], client(server.url, retries=1), runs=1)


def test_unreachable_port_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = client(url, retries=2)
    with pytest.raises(JudgeError, match="unreachable after 3 attempts") as err:
        grade_records(RECORDS[:1], judge, runs=1)
    assert f"{url}/chat/completions" in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in repr(judge)


def test_rejected_key_fails_at_once_naming_the_variable(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with JudgeServer(lambda server, body: (401, b'{"error": "bad key"}')) as server:
        with pytest.raises(JudgeError, match=f"HTTP 401.*\\${KEY_ENV}") as err:
            grade_records(RECORDS[:1], client(server.url), runs=1)
    assert len(server.requests) == 1
    assert SECRET not in str(err.value)


def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with JudgeServer(lambda server, body: reply("Total Score: 50")) as server:
        grade_records(RECORDS[:1], client(server.url), runs=1)
    assert "Authorization" not in server.requests[0][1]


def test_cli_score_with_judge(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(RECORDS))
    out = tmp_path / "run"
    with JudgeServer(by_prediction) as server:
        result = CliRunner().invoke(main, [
            "score", str(pred_file), "--out", str(out), "--judge-url", server.url, "--judge-model", "m",
            "--judge-key-env", KEY_ENV, "--judge-workers", "1", "--judge-retry-delay", "0.01",
        ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["score_definition"] == "judge_mean"
    assert report["table1"]["reasoning"] == pytest.approx(statistics.mean(GRADES["r1"]))
    assert report["judge"]["runs"] == 5
    for name in ("report.json", "report.md", "judge.jsonl"):
        assert SECRET not in (out / name).read_text()
    assert SECRET not in result.output


def test_cli_judge_unreachable_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(RECORDS[:1]))
    result = CliRunner().invoke(main, [
        "score", str(pred_file), "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m",
        "--judge-retries", "1", "--judge-retry-delay", "0.01",
    ])
    assert result.exit_code == 2
    assert "unreachable" in result.output and "Traceback" not in result.output
