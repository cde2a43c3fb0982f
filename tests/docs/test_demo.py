"""`make demo`'s script runs end to end with tiny settings and writes its figures."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

# Second tier (make test-all): the demo end to end, NUTS twice.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_runs_and_saves_figures(tmp_path):
    # A subprocess: the demo turns on float64 globally, which must not leak into other tests.
    arguments = ["--num-steps", "12", "--num-particles", "8", "--num-warmup", "20"]
    arguments += ["--num-samples", "20", "--num-chains", "1", "--no-progress"]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    for name in ("demo_posterior.png", "demo_filtered_states.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    output = completed.stdout
    assert "exact_mean" in output and "Figures saved" in output, output
    # The summary table has a finite posterior mean for every parameter.
    rows = {line.split()[0]: line.split() for line in output.splitlines() if line[:4].strip()}
    for name in ("phi", "q", "r"):
        assert math.isfinite(float(rows[name][1])), rows.get(name)
