# `make demo` and `make test` each install everything from nothing into .venv, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepquant-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build the CI machines carry, so no CUDA wheels are pulled there.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stepquant demo --out build/demo

test: $(STAMP)
	# up to 4 worker processes (pytest-xdist): the Triton-interpreter kernel tests and the kill-and-resume tests dominate
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4

clean:
	rm -rf build .pytest_cache
