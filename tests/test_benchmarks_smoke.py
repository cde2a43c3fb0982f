"""Smoke test of the resampler benchmark script (`--quick`): it runs and reports numbers."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "resampling.py"
RESAMPLERS = {
    "diffusion",
    "diffusion_per_particle",
    "diffusion_per_particle_transposed",
    "multinomial",
    "systematic",
    "stratified",
    "stop_gradient",
    "soft",
    "gumbel_softmax",
    "optimal_transport",
}


def test_quick_benchmark_reports_finite_numbers(tmp_path):
    out = tmp_path / "r.json"
    # A subprocess: the script turns on float64 globally, which must not leak into other tests.
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (tmp_path / "r.md").read_text().startswith("# Resampler benchmark")

    rows = report["results"]
    assert {row["resampler"] for row in rows} >= RESAMPLERS
    for row in rows:
        if row["resampler"] not in RESAMPLERS:
            continue
        assert row["status"] == "ok", row
        for field in ("forward_ms", "gradient_ms", "rms_error"):
            assert math.isfinite(row[field]) and row[field] > 0, (field, row)
    assert report["checks"] and report["speed_ratios"]
    for ratio in report["speed_ratios"]:
        assert math.isfinite(ratio["forward_speedup"]) and math.isfinite(ratio["gradient_speedup"])
