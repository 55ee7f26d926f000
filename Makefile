# README's two commands: `make demo` and `make test`. Both work on a fresh clone:
# they create .venv if absent, install the package, fetch the data, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export AMALGAM_HOME ?= $(HOME)/.cache/amalgam
# Keep an embedded Ray on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test data venv clean-venv

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, at the versions this machine serves from disk (CPU-only use).
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/.installed

data: venv
	$(BIN)/amalgam data fetch

demo: data
	$(BIN)/amalgam zoo train --preset mnist-fashion-4
	$(BIN)/amalgam run jobs/mnist-fashion-4.yaml --out runs/demo

test: data
	$(BIN)/python -m pytest -q --durations=30 tests

clean-venv:
	rm -rf $(VENV)
