"""Shared test helpers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Most tests spend their time in XLA's CPU compiler, not in running what it compiled. Less LLVM
# optimisation compiles faster (measured: 164 s -> 113 s for tests/diagnostics/
# test_gradient_decay.py and tests/filtering/test_filtering_input.py together); it changes
# speed, not what the tests compare. Set before JAX starts its backend; subprocesses inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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
