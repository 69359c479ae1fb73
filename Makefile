# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,bench,mpi,storage,azure]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/cloudmap demo

lint: $(STAMP)
	$(BIN)/ruff check cloudmap tests benchmarks
	$(BIN)/ruff format --check cloudmap tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# From npm, pinned in package-lock.json: Azurite (the Azure Storage emulator) for the storage
# tests, and the standalone widget manager that renders exported notebooks offline.
NODE_STAMP := node_modules/.installed-$(shell cat package-lock.json | sha1sum | cut -c1-12)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	rm -f node_modules/.installed-* && touch $@

# Debian's Chromium, which the browser tests drive with Playwright (apt needs root or sudo).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null

unit: $(STAMP) $(NODE_STAMP) $(CHROMIUM)
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/peers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
