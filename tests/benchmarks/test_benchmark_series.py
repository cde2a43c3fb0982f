"""Smoke test of the many-series benchmark (`--quick`): it runs and reports every row."""

import math


def test_quick_run_reports_compile_gradient_and_nuts_rows(quick_benchmark):
    report, table = quick_benchmark("series", timeout=600)
    assert table.startswith("# Many series")
    assert "SHARED" in table and "Load average" in table
    rows = report["potential"]
    assert [row["num_series"] for row in rows] == report["config"]["series"]
    for row in rows:
        assert row["potential_finite"], row
        assert row["compile_seconds"] > 0 and row["gradient_seconds"] > 0
    nuts = report["nuts"]
    assert {"particle", "exact"} <= set(nuts)
    assert len(nuts["parameters"]) == 4 + report["config"]["nuts_series"]
    for row in nuts["parameters"]:
        assert math.isfinite(row["mean_shift_in_sd"]) and row["sd_ratio"] > 0, row
