"""Shared test helpers."""

import gc
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

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


@pytest.fixture
def quick_benchmark(tmp_path):
    """Run `benchmarks/<name>.py --quick` and return its JSON report and markdown table.

    A subprocess, since the scripts may turn on float64 globally, which must not leak into
    other tests.
    """

    def run(name, timeout=300):
        out = tmp_path / f"{name}.json"
        completed = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        return json.loads(out.read_text()), out.with_suffix(".md").read_text()

    return run
