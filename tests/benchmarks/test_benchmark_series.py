"""Smoke test of the many-series benchmark (`--quick`): it runs and reports every row."""

import math


def test_quick_run_reports_compile_gradient_and_nuts_rows(quick_benchmark):
    report, table = quick_benchmark("series", timeout=600)
    assert table.startswith("# Many series")
    assert "Load average" in table and "Target " in table
    rows = report["potential"]
    assert [row["num_series"] for row in rows] == report["config"]["series"]
    for row in rows:
        assert row["potential_finite"], row
        assert row["compile_seconds"] > 0 and row["gradient_seconds"] > 0
    nuts = report["nuts"]
    assert {"particle", "exact"} <= set(nuts)
    assert len(nuts["parameters"]) == 4 + report["config"]["nuts_series"]
    # 10 + 10 NUTS iterations are a smoke test of the pipeline, not of the posterior (a chain
    # that short may not move at all, so its SD can be 0): both fits report finite means.
    for row in nuts["parameters"]:
        assert math.isfinite(row["particle_mean"]) and math.isfinite(row["exact_mean"]), row
    # The gradient-error table: one row per N, errors against the exact (Kalman) gradient,
    # with a spread over keys (each key is another draw of the fixed noise).
    bias = report["bias"]
    assert [row["num_particles"] for row in bias["rows"]] == [8, 16]
    for row in bias["rows"]:
        assert row["value_error_sd"] > 0 and math.isfinite(row["value_error_mean"]), row
        assert all(math.isfinite(row[f"{name}_grad_error_mean"]) for name in ("phi", "mu"))
    assert "## Why N matters" in table
