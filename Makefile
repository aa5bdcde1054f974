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

# The full suite (what CI runs): lint first, then every test.
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

# Quicker while iterating: everything but the end-to-end workflow tests.
unit: $(STAMP)
	$(BIN)/python -m pytest -q --ignore-glob='tests/test_*_workflow.py'

clean:
	rm -rf $(VENV) medseg-demo .pytest_cache
