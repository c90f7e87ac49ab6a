"""One ablation job's state file (status, calls, seconds, the settings it ran with): read by the
runner to resume and by the report to collect; its own module so neither imports the other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drivekd.fileio import atomic_write_text

STATE_VERSION = 1


def read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}  # a torn write: the job is redone from its checkpoints, which are always complete


def write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps({"version": STATE_VERSION, **state}, indent=2, sort_keys=True) + "\n")
