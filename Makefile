# Two entry points (see README): `make demo` and `make test`.
# Each sets itself up: a local .venv, torch (the CPU build on disk where no torch
# is present), the package in editable mode and its test dependencies (with the triton and peft extras).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test setup clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,dev,triton,peft]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moe-unlearn demo

test: $(STAMP)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
