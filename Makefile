# Set-up, demo and tests in a local virtual environment (.venv).
# TORCH_SPEC picks the torch requirement, e.g. `make test TORCH_SPEC=torch==2.13.0`
# for a CPU wheel already on the machine; by default pip chooses.

PYTHON ?= python3
TORCH_SPEC ?= torch
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint clean test-clients

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

# the suite without the tests marked slow (under 10 minutes on 2 cores), then those
test: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The ecosystem clients (SAEDashboard, SAEBench) in their own environment:
# they pin transformer-lens<3, transformers<4.57, datasets<4 and numpy<2, which
# the main one does not meet. torch first, then pinned to exactly what was
# installed: the newest torchvision the clients pull wants a newer torch, and
# pip would replace the CPU wheel with a CUDA build. Then the clients and this
# package resolve together (pip picks a sae-lens 6 that satisfies all three).
# The torchvision and torchaudio they pull link CUDA torch and break
# `import transformers` on a CPU torch; nothing tested needs them, so they go.
CLIENTS_VENV ?= .venv-clients
CLIENTS_BIN := $(CLIENTS_VENV)/bin

$(CLIENTS_BIN)/python:
	$(PYTHON) -m venv $(CLIENTS_VENV)

$(CLIENTS_VENV)/.installed: $(CLIENTS_BIN)/python pyproject.toml Makefile
	$(CLIENTS_BIN)/python -m pip install "$(TORCH_SPEC)"
	$(CLIENTS_BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(CLIENTS_VENV)/torch-pin.txt
	$(CLIENTS_BIN)/python -m pip install -c $(CLIENTS_VENV)/torch-pin.txt \
		"sae-dashboard==0.8.0" "sae-bench==0.6.0" "pytest>=7" -e .
	$(CLIENTS_BIN)/python -m pip uninstall -y torchvision torchaudio
	touch $@

test-clients: $(CLIENTS_VENV)/.installed
	$(CLIENTS_BIN)/python -m pytest --confcutdir=tests/clients tests/clients

# the environments, caches, and the demo's and examples' default outputs
clean:
	rm -rf $(VENV) $(CLIENTS_VENV) matryoshka_*/ .pytest_cache .ruff_cache .mypy_cache
