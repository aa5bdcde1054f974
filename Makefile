# `make demo` and `make test` set up a local .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo

# The full suite (what CI runs): lint first, then every test, two files at a time (most tests keep one core
# busy: small images, subprocess start-up, one-thread study runs), each worker on one torch thread.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests

# Quicker while iterating: everything but the end-to-end workflow tests.
unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore-glob='tests/test_*_workflow.py'

clean:
	rm -rf $(VENV) medseg-demo .pytest_cache
