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

.PHONY: demo test test-cpus lint typecheck bench bench-quick clean

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

# The training/integration tests (marker `integration`, set in tests/conftest.py) again
# under other ATen CPU kernels: their outcomes go through the vectorized kernels, which
# differ between CPUs. `make test` runs them on this CPU's best kernels (e.g. AVX-512).
CPU_CAPABILITIES ?= default avx2

test-cpus: $(STAMP)
	@failed=""; for cap in $(CPU_CAPABILITIES); do \
	    used=$$(ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -c \
	        'import torch; print(torch.backends.cpu.get_cpu_capability())') || exit 1; \
	    echo "== integration tests with ATEN_CPU_CAPABILITY=$$cap (torch uses $$used)"; \
	    ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m integration; rc=$$?; \
	    if [ $$rc -eq 5 ]; then \
	        echo "error: no test is marked 'integration' (pytest exit code 5): the" \
	             "marker hook in tests/conftest.py selected nothing" >&2; exit 1; \
	    elif [ $$rc -ne 0 ]; then \
	        echo "error: pytest exit code $$rc with ATEN_CPU_CAPABILITY=$$cap" >&2; \
	        failed="$$failed $$cap"; \
	    fi; \
	done; \
	if [ -n "$$failed" ]; then \
	    echo "error: integration tests failed with ATEN_CPU_CAPABILITY in:$$failed" >&2; \
	    exit 1; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy lr_monitor

bench: $(STAMP)
	$(PIP) install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/divergence_suite.py
	$(BIN)/python benchmarks/step_quality.py
	$(BIN)/python benchmarks/edge_of_stability.py

bench-quick: $(STAMP)
	$(PIP) install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python benchmarks/overhead.py --quick
	$(BIN)/python benchmarks/divergence_suite.py --quick
	$(BIN)/python benchmarks/edge_of_stability.py --quick --out /tmp/lr-monitor-bench --img /tmp/lr-monitor-bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache lr_monitor_runs
