# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and install the tested versions pinned in
# requirements/constraints.txt (torch 2.13.0, the CPU build).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
LINTED := $(wildcard lr_monitor tests examples benchmarks)
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench bench-quick clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and exactly, so that nothing resolves a multi-GB CUDA build.
	$(PIP) install --disable-pip-version-check -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lr-monitor demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy lr_monitor

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy lr_monitor

bench: $(STAMP)
	$(PIP) install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/divergence_suite.py

bench-quick: $(STAMP)
	$(PIP) install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python benchmarks/overhead.py --quick
	$(BIN)/python benchmarks/divergence_suite.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache lr_monitor_runs
