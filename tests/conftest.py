"""Shared test helpers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
