"""Smoke test of the stability benchmark (`--quick`): it runs and reports what it measures."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


def test_quick_run_reports_chains_and_memory(quick_benchmark):
    report, table = quick_benchmark("stability")
    config = report["config"]
    assert table.startswith("# Stability")
    assert len(report["chains"]) == config["chains"] == 2
    for chain in report["chains"]:
        assert chain["nan_draws"] == 0 and chain["non_finite_potential"] == 0, chain
        assert all(math.isfinite(v) for v in chain["posterior_mean"].values())
    tenths = report["rss_mb_at_tenths"]
    assert len(tenths) == 11 and all(v > 0 for v in tenths.values())
    assert report["peak_rss_mb"] >= max(tenths.values()) * 0.99
    for mode in ("keep_caches", "clear_caches"):
        rows = report["repeated_runs"][mode]
        assert [row["run"] for row in rows] == list(range(config["repeat_runs"]))
        assert all(row["rss_mb"] > 0 and row["seconds"] > 0 for row in rows)
    assert "## Repeated runs of one MCMC object" in table
