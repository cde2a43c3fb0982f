"""Smoke test of the roughness benchmark (`--quick`): the mitigation must beat the default."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


def test_quick_run_mitigation_beats_default(quick_benchmark):
    report, table = quick_benchmark("roughness", timeout=900)
    assert table.startswith("# Roughness")
    rows = {row["name"]: row for row in report["growth"]}
    default = rows["diffusion() (default)"]
    best = rows["guided proposal, gradient_decay(diffusion(), 0)"]
    assert default["finite"] and best["finite"]
    # The default's fixed-key gradient is far steeper than the reference slope; the guided,
    # history-free gradient is not, and it tracks the slope at more grid points.
    slope_size = max(abs(v) for v in report["reference"]["slope_range"])
    assert default["max_abs_gradient"] > 10 * slope_size
    assert best["max_abs_gradient"] < default["max_abs_gradient"] / 10
    assert best["within_factor_3"] > default["within_factor_3"]
    assert report["diagnostic"]["diffusion() (default)"]["verdict"] == "rough"
    assert report["diagnostic"][best["name"]]["verdict"] == "smooth"
    nuts = report["nuts"][0]
    assert math.isfinite(nuts["mean"]) and nuts["divergences"] == 0
    assert "## Targets" in table
