# Two entry points (see README): `make demo` and `make test`.
# Each sets itself up: a local .venv, torch (the CPU build on disk where no torch is present), the package
# in editable mode and its test dependencies (with the triton and peft extras), at the exact versions of
# constraints.txt (the versions the suite last passed with). The package's own ranges stay ranges.
#
# Two more, opt-in:
#   make test-latest   the suite against the newest releases the ranges allow (.venv-latest, no constraints)
#   make constraints   rewrite constraints.txt from .venv-latest (after `make test-latest` passed)
#   make test-floor    the suite against the lowest version of every declared dependency (.venv-floor)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
EXTRAS := .[test,dev,triton,peft]
PYTEST := TRITON_INTERPRET=1 OMP_NUM_THREADS=2 python -m pytest -q tests

.PHONY: demo test setup clean test-latest test-floor constraints

# $(call make-venv,DIR,PIP-ARGS): a venv in DIR with torch and the package installed with PIP-ARGS
define make-venv
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade $(2) pip "setuptools>=77" wheel
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install -q --no-build-isolation $(2) -e "$(EXTRAS)"
endef

$(STAMP): pyproject.toml setup.py constraints.txt
	$(call make-venv,$(VENV),-c constraints.txt)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moe-unlearn demo

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PYTEST)

test-latest:
	$(call make-venv,.venv-latest,--upgrade --upgrade-strategy eager)
	PATH="$(CURDIR)/.venv-latest/bin:$$PATH" $(PYTEST)

constraints:
	test -x .venv-latest/bin/python || { echo "run 'make test-latest' first"; exit 2; }
	{ sed -n '1,3p' constraints.txt; \
	  .venv-latest/bin/python -m pip --version | awk '{print "pip==" $$2}'; \
	  .venv-latest/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(setuptools|wheel)=='; \
	  .venv-latest/bin/python -m pip freeze 2>/dev/null | grep -viE '^(-e |moe.unlearn|torch==)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test-floor:
	test -x .venv-floor/bin/python || $(PY) -m venv .venv-floor
	.venv-floor/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel packaging
	.venv-floor/bin/python tests/support/floor_constraints.py .venv-floor/floor.txt
	$(call make-venv,.venv-floor,-c .venv-floor/floor.txt)
	PATH="$(CURDIR)/.venv-floor/bin:$$PATH" $(PYTEST)

clean:
	rm -rf $(VENV) .venv-latest .venv-floor build *.egg-info
