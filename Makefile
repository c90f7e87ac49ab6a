# The two commands of the README: `make demo` and `make test`. Both install first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.drivekd-installed
DEMO ?= demo
# The exact versions the suite last passed on: `make install` installs them, `make upgrade` refreshes them.
LOCK := requirements.lock
# torch stays out of the lock: it is installed first, on its own line (a machine that already has a
# torch, e.g. a CUDA build, keeps it).
TORCH := 2.13.0
UPGRADE_VENV := .venv-upgrade

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install upgrade test test-fast test-durations demo ablate-demo analyze-demo clean bench

install: $(STAMP)

# torch first, pinned: an unpinned torch (directly or via a dependency's range) pulls GBs of CUDA
# packages on a CPU machine. The editable install then finds torch satisfied, and every other
# package at the version of requirements.lock (-c: constraints, installed only where needed).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH)
	$(PIP) install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# Refresh requirements.lock: the newest versions pyproject.toml allows go into a scratch venv, the
# whole suite runs there, and only if it passes is the lock rewritten from that venv (drivekd and
# torch left out). To try a newer transformers minor, raise its upper bound in pyproject.toml first.
upgrade:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install -q torch==$(TORCH)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade -e ".[dev]"
	$(UPGRADE_VENV)/bin/python -m pytest tests
	{ sed -n '/^#/p' $(LOCK); $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(UPGRADE_VENV)
	@echo "requirements.lock refreshed; make install (or rm $(STAMP)) to use it, and commit it"

# pytest-xdist workers for make test / test-fast: one per core of the 2-core machine the suite is sized
# for (each worker runs torch on one OpenMP thread, tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

# The whole suite, slow tests included (the CI's check); the 15 slowest are listed at the end.
test: install
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --durations=15

# The edit loop: everything but the tests marked `slow` (end-to-end runs, real-size plans, subprocesses).
test-fast: install
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal -m "not slow" --durations=15

# Refresh tests/durations.json (seconds per test file), which orders the files heaviest first so the two
# workers finish together (tests/conftest.py); commit it when the suite's weight moved.
test-durations: install
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --write-durations tests/durations.json

# The untrained student, a CE student, a KD student and the teacher on the held-out split, side by
# side ($(DEMO)/summary.md). One OpenMP thread, as below.
demo: install
	OMP_NUM_THREADS=1 $(PY) tools/demo.py --out $(DEMO)

# Every row of the paper's Table 4 and Appendix E on the demo data, two steps and two seeds each
# (configs/ablations/demo.toml): $(DEMO)/ablation/report.{md,json,png}, trained on the first scenes of
# the demo's train split and evaluated on the first of its held-out split ([data] of $(DEMO)/drivekd.toml).
# `make demo` (resumable) first makes the data and the store (its perception role); the other roles and
# the logits and hidden signals of the CE + KL and CE + Hidden rows are added to that store (only what
# is missing). Rerunning skips finished runs.
# One OpenMP thread: the tiny models gain nothing from two, and on a shared machine two threads
# spin-wait whenever another process holds a core (measured here at load ~7: 2 min with one, 17 with two).
ablate-demo: demo
	OMP_NUM_THREADS=1 $(PY) -m drivekd.cli.cache build --config $(DEMO)/drivekd.toml --teacher all --signals attention,logits,hidden --no-progress
	OMP_NUM_THREADS=1 $(PY) -m drivekd.cli.ablate --config configs/ablations/demo.toml --project $(DEMO)/drivekd.toml --out $(DEMO)/ablation

# The pre-studies (drivekd-analyze) on the demo teacher and scenes: $(DEMO)/analysis/*.png, analysis.json
analyze-demo: install
	$(PY) -m drivekd.analyze.demo --demo $(DEMO)

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) $(DEMO) .pytest_cache
