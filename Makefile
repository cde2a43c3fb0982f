# The two set-up commands a fresh machine needs: `make demo` and `make test`. `make test` is the
# development tier (unit, oracle and small end-to-end tests, under 10 minutes with the install on
# 2 cores); `make test-all` adds the tests marked `slow` (NUTS/SVI against exact posteriors, the
# examples and the demo end to end, benchmark `--quick` runs, the long bias checks) and is what
# CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all lint docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,docs,dev]"
	touch $@

$(VENV)/.installed-examples: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[examples]"
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) examples/demo.py

# The suite runs in float32 (JAX's default); the resamplers' numerical tests run again in
# float64, since users run both (argument checks and transforms do not depend on the dtype,
# and `fixed_precision` tests already run at the precisions they check).
# The filter's oracle tests switch float64 on themselves. Two pytest-xdist workers (one test
# file each at a time, so module fixtures are compiled once): most tests are dominated by
# single-threaded XLA compilation, so two processes use both cores of a CI machine. A worker
# that dies ends the run at once (--max-worker-restart=0): after one crash pytest-xdist went on
# waiting until CI's time limit instead of reporting it.
# Compiler settings (benchmarks/results/suite_timing.md): XLA's older CPU code emitters
# (`xla_cpu_use_fusion_emitters=false`) and LLVM optimisation level 1 compile the filter's
# gradient in half the time of the defaults, and the compiled code ran about as fast (level 0
# compiles faster still but ran the filter's gradient and the samplers about twice as slowly).
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --max-worker-restart=0
TEST_XLA_FLAGS := --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1
TEST_ENV := XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS"
X64_TESTS = $(filter-out %/test_bad_input.py %/test_transforms.py,$(wildcard tests/resampling/test_*.py))
# Both tiers run the same float64 rerun (the slow tests stay out of it, as before the tiers).
# `-m` can select no test (pytest's exit status 5, e.g. with PYTEST_ARGS="-k ..."): not a failure.
# PYTEST_ARGS goes to every pytest run, e.g. PYTEST_ARGS="--durations=30".
PYTEST_ARGS ?=
NO_TESTS_OK := || [ $$? -eq 5 ]
X64_RERUN = $(TEST_ENV) JAX_ENABLE_X64=1 $(PYTEST) $(PYTEST_ARGS) -m "not slow and not fixed_precision" $(X64_TESTS) $(NO_TESTS_OK)
test: $(VENV)/.installed-test
	$(TEST_ENV) $(PYTEST) $(PYTEST_ARGS) -m "not slow" $(NO_TESTS_OK)
	$(X64_RERUN)

# One run of every test (not `make test` then the slow ones): the workers share the whole load.
test-all: $(VENV)/.installed-test
	$(TEST_ENV) $(PYTEST) $(PYTEST_ARGS) $(NO_TESTS_OK)
	$(X64_RERUN)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: $(VENV)/.installed-test
	$(VENV)/bin/mkdocs build --strict --site-dir site

# `make bench` runs every benchmark (hours: each rewrites its committed table); `make bench
# NAME=resampling` one of them, `ARGS=--quick` a smoke run. `python -m benchmarks --list`.
NAME ?= --all
ARGS ?=
bench: $(VENV)/.installed-test
	$(PY) -m benchmarks $(NAME) $(ARGS)

clean:
	rm -rf $(VENV) site out .pytest_cache
