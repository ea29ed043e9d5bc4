# Set-up, demo and tests in a local virtual environment (.venv).
# TORCH_SPEC picks the torch requirement, e.g. `make test TORCH_SPEC=torch==2.13.0`
# for a CPU wheel already on the machine; by default pip chooses.

PYTHON ?= python3
TORCH_SPEC ?= torch
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# re-installs when pyproject.toml changes
$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	# the paper's trainer, an oracle in the tests; --no-deps: its nnsight/wandb are stubbed there
	$(BIN)/python -m pip install --no-deps "dictionary-learning==0.1.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/sae-lens-matryoshka toy

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the environment, caches, and the demo's and examples' default outputs
clean:
	rm -rf $(VENV) matryoshka_*/ .pytest_cache .ruff_cache .mypy_cache
