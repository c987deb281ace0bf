# Two set-up-free entry points: `make demo` (the main job, offline, CPU) and `make test`.
# Each creates .venv on first use. On the reference machine `pip install torch==2.13.0` takes a local
# CPU wheel; elsewhere override TORCH, e.g. make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
# EXTRAS picks the optional dependency groups installed with the package (CI installs every one).
PYTHON ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= test
VENV := .venv
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
LINT := $(VENV)/.installed-lint
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint mutation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tdpm-dip demo --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(LINT): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e '.[lint]'
	touch $(LINT)

# ruff (lint and format) on the code and mypy on src/, as CI and the pre-commit hooks run them.
lint: $(LINT)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

# Mutation testing of the numerical core (docs/mutation.md): mutmut 3 with pyproject.toml's [tool.mutmut], run in
# build/mutation, a copy of src/ and tests/ (tests/mutation/tree.py: the target functions, no_grad as a with block);
# niced, one thread, one child. Results are kept there: a later run tests new or changed mutants and retries those
# not killed before. `make mutation MUTANTS='tdpm_dip.noise.*'` runs a subset; `rm -rf build/mutation` starts over.
# Then tests/mutation/required.py checks the four mutants the project names (written by hand: mutmut does not).
MUTMUT ?= mutmut>=3.8,<4
MUTATION_DIR := build/mutation
MUTANTS ?=

mutation: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q '$(MUTMUT)'
	$(BIN)/python tests/mutation/tree.py $(MUTATION_DIR)
	cd $(MUTATION_DIR) && $(CURDIR)/$(BIN)/python $(CURDIR)/tests/mutation/report.py --retry-not-killed
	cd $(MUTATION_DIR) && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 $(CURDIR)/$(BIN)/mutmut run --max-children 1 $(MUTANTS)
	cd $(MUTATION_DIR) && $(CURDIR)/$(BIN)/python $(CURDIR)/tests/mutation/report.py
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/python tests/mutation/required.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
