"""Files a long job keeps writing: never half-written, and a full disk is one clear error."""

import json
import os
from pathlib import Path

import pytest

from drivekd.errors import DriveKDError
from drivekd.fileio import append_line, atomic_write_text
from drivekd.trainer.identity import write_run_json
from drivekd.trainer.loop import _truncate_metrics

FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")
def test_append_on_a_full_disk_is_one_clear_error():
    with pytest.raises(DriveKDError, match=r"disk full.*--resume"):
        append_line(FULL, json.dumps({"step": 3}), "the metrics log", "free space, then continue with --resume")


def test_a_killed_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    run_json = tmp_path / "run.json"
    write_run_json(run_json, {"config": {"lr": 1}}, None, 0)
    before = run_json.read_text()

    def killed(*a, **k):  # the process dies between writing the new content and putting it in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_run_json(run_json, {"config": {"lr": 2}}, tmp_path / "step-000002", 2)
    assert run_json.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary file left behind


def test_resume_reads_a_metrics_log_whose_last_line_was_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')  # the disk filled during step 4's line
    _truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_atomic_write_text_replaces_whole_content(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.md", "new\n")
    assert p.read_text() == "new\n" and [x.name for x in p.parent.iterdir()] == ["a.md"]
