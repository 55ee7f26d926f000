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
	# A download from the package index can break off midway (seen once: 12 of 17 MB, six
	# resumes): pip resumes harder, and the whole install is tried three times before failing.
	@for i in 1 2 3; do \
	  $(BIN)/pip install -q --retries 10 --resume-retries 20 -e '.[test]' && break; \
	  if [ $$i = 3 ]; then echo "make: pip install failed 3 times" >&2; exit 1; fi; \
	  echo "make: pip install failed (attempt $$i of 3); retrying in 15 s" >&2; sleep 15; \
	done
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
