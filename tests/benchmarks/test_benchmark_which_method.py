"""Smoke test of `benchmarks/which_method.py --quick`: the package's kernels on the growth model."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


def test_quick_run_reports_every_kernel_against_the_reference(quick_benchmark):
    report, table = quick_benchmark("which_method", timeout=900)
    assert table.startswith("# Which sampler when")
    case = report["cases"]["growth"]
    assert set(case["reference"]) == {"sv"}
    assert set(case["methods"]) == {"pmmh", "pmmh_noise", "cpmmh"}
    for result in case["methods"].values():
        assert result["min_ess"] > 0 and math.isfinite(result["seconds_to_400_ess"])
        assert math.isfinite(result["statics"]["sv"]["error_in_sd"])
        assert result["statics"]["sv"]["sd"] > 0
    assert "ndr.infer.CorrelatedPMMH" in table
