# The two commands of the README: `make demo` and `make test`. Both install first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.drivekd-installed
DEMO ?= demo

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo analyze-demo clean bench

install: $(STAMP)

# torch first, pinned: an unpinned torch (directly or via a dependency's range) pulls GBs of CUDA
# packages on a CPU machine. The editable install then finds torch satisfied.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest tests

demo: install
	$(PY) tools/demo.py --out $(DEMO)

# The pre-studies (drivekd-analyze) on the demo teacher and scenes: $(DEMO)/analysis/*.png, analysis.json
analyze-demo: install
	$(PY) -m drivekd.analyze.demo --demo $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
