# Two commands a new machine needs: `make demo` and `make test`. Both create ./.venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration bench chaos clean

install: $(STAMP)

# torch first, pinned to the CPU build on local disk: anything unpinned would pull a multi-GB CUDA build.
# torchvision is never installed (its PyPI wheel breaks the diffusers import here). open-clip-torch only
# ships the CLIP BPE vocabulary we build the tokenizer from, so it comes without its dependencies.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "skillgen needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/skillgen demo

test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q -m unit

test-integration: install
	$(PY) -m pytest -q -m "integration or e2e"

# The chaos suite (bench/chaos.py): real broker, Redis and services, faults injected; writes bench/results/chaos.json.
chaos: install
	$(PY) -m bench.chaos

clean:
	rm -rf $(VENV) .cache out .pytest_cache
