"""Smoke test of `benchmarks/versus_latent_nuts.py --quick`: both fits run and are reported."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


def test_quick_benchmark_reports_both_fits(quick_benchmark):
    report, table = quick_benchmark("versus_latent_nuts", timeout=600)
    assert table.startswith("# One NumPyro model, two fits")
    (case,) = report["cases"]
    assert case["num_steps"] == 15
    # The log-likelihood noise at the latent posterior mean, over keys: some, and finite.
    assert 0 < case["log_likelihood_sd"] < math.inf
    assert "Log-likelihood SD over 8 keys" in table
    for key in ("latent_nuts", "marginalize_nuts"):
        result = case[key]
        assert result["min_ess"] > 0 and math.isfinite(result["seconds_to_400_ess"])
        assert set(result["mean"]) == {"mu", "phi", "sigma"}
        assert all(math.isfinite(value) for value in result["mean"].values())
        assert all(value > 0 for value in result["sd"].values())
    assert math.isfinite(case["time_to_400_ess_ratio"]) and case["time_to_400_ess_ratio"] > 0
    assert "marginalize + NUTS" in table
    # The hard model: both fits of the growth program, sv only.
    growth = report["growth"]
    for key in ("latent_nuts", "marginalize_nuts"):
        assert set(growth[key]["mean"]) == {"sv"} and growth[key]["sd"]["sv"] > 0
        assert math.isfinite(growth[key]["seconds_to_400_ess"])
    assert "nonlinear growth" in table
    # The N rule on the SV case: the SDs it measured, the N it stopped at (the first with an
    # SD of at most 1, or the cap of 16), one timed gradient and a projection from it.
    (rule,) = report["rule"]["rows"]
    counts = [n for n, _ in rule["tried"]]
    assert counts[0] == case["num_particles"] and counts[-1] == rule["num_particles"]
    assert all(later >= 2 * earlier for earlier, later in zip(counts[:-1], counts[1:], strict=True))
    assert all(sd > 1.0 for _, sd in rule["tried"][:-1])
    assert rule["reached"] == (rule["sd"] <= 1.0) and (rule["reached"] or counts[-1] == 16)
    assert rule["gradient_seconds"] > 0
    assert rule["projected_fit_seconds"] == pytest.approx(
        rule["iterations"] * rule["leapfrog_per_iteration"] * rule["gradient_seconds"]
    )
    assert "## The N rule" in table
