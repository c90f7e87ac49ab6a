"""The judge's sampling settings: DriveBench's temperature by default, and a resume log that never
hands grades sampled at one temperature to a run asking for another."""

import json

from click.testing import CliRunner

from drivekd.cli.eval import main
from drivekd.eval.judge import DRIVEBENCH_TEMPERATURE, grade_records
from test_eval_judge import RECORDS, JudgeServer, client, no_proxy, reply  # noqa: F401 (no_proxy: autouse fixture)


def test_default_temperature_is_drivebench():
    # DriveBench's GPT evaluation (worldbench/drivebench evaluate/request.py): temperature=0.0.
    assert DRIVEBENCH_TEMPERATURE == 0.0
    help_text = CliRunner().invoke(main, ["score", "--help"]).output
    assert "--judge-temperature" in help_text and "DriveBench" in help_text


def test_log_reuses_grades_only_at_the_same_temperature(tmp_path):
    log = tmp_path / "judge.jsonl"
    with JudgeServer(lambda server, body: reply("Total Score: 40")) as cold:
        assert grade_records(RECORDS[:2], client(cold.url), runs=2, log_path=log) == {"p1": [40.0, 40.0], "p2": [40.0, 40.0]}
    assert {json.loads(l)["temperature"] for l in log.read_text().splitlines()} == {0.0}
    with JudgeServer(lambda server, body: reply("Total Score: 70")) as warm:
        grades = grade_records(RECORDS[:2], client(warm.url, temperature=1.0), runs=2, log_path=log)
    assert grades == {"p1": [70.0, 70.0], "p2": [70.0, 70.0]}  # asked again, not the temperature-0 grades
    assert len(warm.requests) == 4 and {r[2]["temperature"] for r in warm.requests} == {1.0}
    with JudgeServer(lambda server, body: reply("Total Score: 99")) as again:
        assert grade_records(RECORDS[:2], client(again.url, temperature=1.0), runs=2, log_path=log) == grades
        assert grade_records(RECORDS[:2], client(again.url), runs=2, log_path=log)["p1"] == [40.0, 40.0]
    assert again.requests == []
