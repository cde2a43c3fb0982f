"""Shared test helpers, and the compiler settings of the test run."""

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# JAX's persistent compilation cache, shared by the workers and the subprocesses of one run
# (set before JAX starts; subprocesses inherit the environment). Many tests build the same
# filter from fresh closures, which JAX's in-memory caches (keyed by function identity) cannot
# reuse but the persistent cache (keyed by the compiled program, JAX version and flags) can.
# The compiled program is the same either way, so results are unchanged; `make clean` removes
# the folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The benchmark smoke runs and the sharding check are compile-bound (profiled: about 85% of a
# `--quick` run is XLA compiling) and run their compiled code for a moment only: their
# subprocesses compile with XLA's older CPU code emitters at LLVM's optimisation level 0, the
# fastest compile measured (benchmarks/results/suite_timing.md). Not for the tests themselves:
# NUTS tests run thousands of gradients, which level 0 made about 1.8x slower (`make test`
# sets level 1).
SMOKE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from script_loader import load_script  # noqa: E402

# Every executable XLA compiles on the CPU maps its code into the process (about three memory
# maps each), and JAX keeps them all cached. A test worker compiles thousands, and Linux caps a
# process at `vm.max_map_count` maps (65530 by default): near the cap LLVM's next code mapping
# fails and the worker dies in the middle of a compilation (seen twice, late in a full run, with
# about 2000 new maps a minute). Between test files, a worker past this many maps drops JAX's
# caches, which unmaps their code.
MAX_MAPS = 20_000
PROC_MAPS = Path("/proc/self/maps")


def _num_maps():
    try:
        with PROC_MAPS.open() as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such cap to guard against
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_code_maps():
    yield
    if _num_maps() > MAX_MAPS:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def compile_fast_env():
    """`compile_fast_env(flags="")`: the environment of a compile-bound subprocess.

    The run's own XLA flags, then `SMOKE_XLA_FLAGS`, then `flags`: where a flag is given twice
    XLA takes the last.
    """

    def env(flags=""):
        parts = (os.environ.get("XLA_FLAGS", ""), SMOKE_XLA_FLAGS, flags)
        return dict(os.environ, XLA_FLAGS=" ".join(part for part in parts if part))

    return env


@pytest.fixture
def quick_benchmark(tmp_path, compile_fast_env):
    """Run `python -m benchmarks <name> --quick` and return its JSON report and markdown table.

    A subprocess, since the scripts may turn on float64 globally, which must not leak into
    other tests.
    """

    def run(name, timeout=300):
        out = tmp_path / f"{name}.json"
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks", name, "--quick", "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=compile_fast_env(),
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        return json.loads(out.read_text()), out.with_suffix(".md").read_text()

    return run


@pytest.fixture
def benchmark_module():
    """Import `benchmarks/<name>.py` as a module (its functions, without running `main`).

    Some scripts switch float64 on at import, as a script would: the suite's dtype is restored.
    """
    return lambda name: load_script(BENCHMARKS / f"{name}.py", f"benchmark_{name}")


def _mcse_mean(draws):
    """Monte Carlo standard error of the mean from ArviZ's ESS, draws `(chains, draws)` or
    `(draws,)`."""
    import arviz as az  # only the sampler tests need it: no import cost for the others

    draws = np.asarray(draws)
    return float(draws.std() / math.sqrt(float(az.ess(draws.reshape(-1, draws.shape[-1])))))


@pytest.fixture(scope="session")
def mcse_mean():
    """`mcse_mean(draws)`: the Monte Carlo standard error of a chain's mean (ArviZ's ESS)."""
    return _mcse_mean


# The two tiers (Makefile): `make test` leaves out the tests marked `slow`, `make test-all` runs
# them too. A fast-tier test phase (setup or call) longer than this is named at the end of the run,
# as a candidate for the `slow` marker; a note, not a failure, since a loaded machine can be slow.
FAST_TIER_NOTE_S = 60.0
_long_fast_tier_phases = []


def pytest_runtest_logreport(report):
    if report.duration > FAST_TIER_NOTE_S and "slow" not in report.keywords:
        _long_fast_tier_phases.append(f"{report.duration:.1f}s {report.when} {report.nodeid}")


def pytest_terminal_summary(terminalreporter):
    if _long_fast_tier_phases:
        terminalreporter.write_sep("=", f"unmarked test phases over {FAST_TIER_NOTE_S:.0f} s")
        for line in _long_fast_tier_phases:
            terminalreporter.write_line(f"{line} (second tier? mark it slow)")
