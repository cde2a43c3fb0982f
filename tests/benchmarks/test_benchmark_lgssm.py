"""Smoke test of the linear-Gaussian benchmark script (`--quick`): it runs and reports numbers."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow

PER_RUN_FIELDS = ("rmse", "rmse_subset", "filtering_kl", "gradient_norm", "parameter_error")


def test_quick_benchmark_reports_finite_numbers(quick_benchmark):
    report, table = quick_benchmark("lgssm")
    assert table.startswith("# Linear-Gaussian benchmark")

    meta = report["meta"]
    assert meta["grid"] == 8 and meta["runs"] == 1 and meta["num_particles"] == 32
    assert report["exact"]["converged_fraction"] == 1.0

    methods = report["methods"]
    assert {row["family"] for row in methods} >= {"diffusion", "multinomial"}
    for row in methods:
        assert row["name"] in table
        assert row["grid_points"] == 64
        assert len(row["runs"]) == 1
        for run in row["runs"]:
            for field in PER_RUN_FIELDS:
                assert math.isfinite(run[field]), (row["name"], field, run[field])
            assert run["rmse"] > 0 and run["filtering_kl"] > 0
            assert all(math.isfinite(value) for value in run["theta"])
            assert math.isfinite(run["seconds"]) and run["seconds"] > 0
        summary = row["summary"]
        assert math.isfinite(summary["rmse"]["mean"])
        assert math.isfinite(summary["filtering_kl"]["mean"])

    # The PF log-likelihood carries no log N offset: its mean over keys sits within a few
    # standard errors plus the (negative) Jensen gap of the exact value, not log N = 3.47 off.
    check = report["normalisation_check"][0]
    assert check["num_particles"] == 32
    assert math.isfinite(check["mean"]) and math.isfinite(check["kalman"])
    assert abs(check["log_mean_exp"] - check["kalman"]) < math.log(32)
