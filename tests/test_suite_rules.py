"""Rules of the suite itself (issue 25): no test asserts wall time (a shared or slower machine fails
it for no fault of the code), and `make test` runs every test while `make test-fast` leaves out `slow`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# What reads a clock or a run's own timing in an assert.
CLOCK = re.compile(r"time\.time\(|perf_counter\(|monotonic\(|ru_utime|ru_stime"
                   r"|\b\w*(cpu_s|wall_s|seconds|elapsed|duration)\w*\b\W{0,2}\s*<")


def clock_asserts(source: str) -> list[int]:
    """Lines of the asserts in `source` that compare a clock reading."""
    lines = source.splitlines()  # once per file (ast.get_source_segment splits the whole source per call)
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Assert) and CLOCK.search("\n".join(lines[node.lineno - 1:node.end_lineno]))]


def test_no_test_asserts_wall_time():
    found = [f"{p.name}:{line}" for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name
             for line in clock_asserts(p.read_text())]
    assert not found, f"asserts on wall time: {found}"
    # the check sees the forms it was written for
    assert clock_asserts("assert time.time() < deadline\nassert cpu_s < 60, cpu_s\nassert n < 60\n") == [1, 2]
    assert clock_asserts('assert a["seconds"] < 2.0\nassert rec["train_wall_s"] > 0\n') == [1]


def test_make_test_runs_everything_and_test_fast_skips_slow():
    make = (ROOT / "Makefile").read_text()
    test = re.search(r"^test: .*\n((?:\t.*\n)+)", make, re.M).group(1)
    fast = re.search(r"^test-fast: .*\n((?:\t.*\n)+)", make, re.M).group(1)
    assert "pytest tests" in test and "not slow" not in test and "--durations=15" in test
    assert "-n $(TEST_WORKERS)" in test and "-n $(TEST_WORKERS)" in fast  # both cores (pytest-xdist)
    assert '-m "not slow"' in fast
    assert "slow:" in (ROOT / "pyproject.toml").read_text()  # registered: an unknown marker is an error


def test_heaviest_files_are_collected_first():
    """The order make test's workers split and steal from (conftest.py): files by their weight in
    tests/durations.json, heaviest first, each file whole and in its own order; unknown files last."""
    import json

    import conftest

    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    weights = json.loads(conftest.DURATIONS.read_text())
    heavy, light = sorted(weights, key=weights.get)[-1], sorted(weights, key=weights.get)[0]
    ids = [f"{light}::a", "tests/test_unknown_file.py::x", f"{heavy}::b", f"{light}::c", f"{heavy}::d"]
    items = [Item(i) for i in ids]
    conftest.pytest_collection_modifyitems(None, items)
    assert [it.nodeid for it in items] == [f"{heavy}::b", f"{heavy}::d", f"{light}::a", f"{light}::c",
                                           "tests/test_unknown_file.py::x"]
