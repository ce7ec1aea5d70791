# Set up a virtual environment and run the project's jobs.
#   make test        create .venv if missing, install, run the test suite (test-unit, test-distributed and
#                    test-e2e run one tier each; test-fault the fault-injection tests of all three)
#   make quickstart  create .venv if missing, install, run the main job
#   make bench       the attention benchmark (docs/BENCHMARKS.md)
#   make bench-quick the attention benchmark at 2K and 4K tokens
PYTHON ?= python3
VENV ?= .venv
# On this project's CPU machines torch 2.13.0 is a local CPU wheel; a plain `torch`
# would pull a multi-GB CUDA build. GPU users install their own torch first.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-unit test-distributed test-e2e test-fault test-all test-slow test-gpu quickstart bench bench-quick clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" --durations=25

test-unit: $(STAMP)
	$(PY) -m pytest -m "not slow" tests/unit

test-distributed: $(STAMP)
	$(PY) -m pytest -m "not slow" tests/distributed

test-e2e: $(STAMP)
	$(PY) -m pytest -m "not slow" tests/e2e

test-fault: $(STAMP)
	$(PY) -m pytest -m "fault and not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest -m ""

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

quickstart: $(STAMP)
	PYTHON=$(abspath $(PY)) examples/quickstart_cpu.sh

bench: $(STAMP)
	$(PY) bench/attention.py --heads 4 --repeats 1

bench-quick: $(STAMP)
	$(PY) bench/attention.py --quick

clean:
	rm -rf $(VENV) *.egg-info
