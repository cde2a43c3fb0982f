"""Smoke tests of the benchmark scripts (`--quick`): they run and report numbers."""

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


SCALING_SCRIPT = SCRIPT.parent / "scaling.py"
SCALING_SECTIONS = ("nuts", "gradient", "resampler", "accuracy", "precision")


def test_quick_scaling_benchmark_covers_every_section(tmp_path):
    out = tmp_path / "s.json"
    completed = subprocess.run(
        [sys.executable, str(SCALING_SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(out.read_text())
    markdown = (tmp_path / "s.md").read_text()
    assert markdown.startswith("# Scaling benchmark")
    assert set(SCALING_SECTIONS) <= set(report)
    assert "Claim 'at equal resampled-mean error" in markdown

    def positive(value):
        return math.isfinite(value) and value > 0

    assert all(positive(row["seconds"]) for row in report["nuts"])
    gradient = report["gradient"]
    assert {row["method"] for row in gradient} == {
        "diffusion",
        "optimal_transport",
        "stop_gradient",
    }
    assert all(positive(row["temporary_MiB"]) for row in gradient if row["N"] >= 256)
    assert any(row["value_and_grad_ms"] is not None for row in gradient)
    resampler = [row for row in report["resampler"] if row.get("forward_ms") is not None]
    assert resampler and all(positive(row["forward_ms"]) for row in resampler)
    accuracy = [row for row in report["accuracy"]["rows"] if "rms_error" in row]
    assert {row["method"] for row in accuracy} == {"diffusion", "optimal_transport"}
    for row in accuracy:
        for field in ("forward_ms", "rms_error", "input_rms_error", "variance_ratio"):
            assert positive(row[field]), (field, row)
    assert report["accuracy"]["comparisons"]
    for row in report["precision"]:
        assert math.isfinite(row["relative_difference_key0"])
