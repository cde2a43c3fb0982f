"""Smoke test of the latent-paths benchmark (`--quick`): it runs and reports what it measures."""

import math


def test_quick_run_reports_predictive_nuts_and_accuracy(quick_benchmark):
    report, table = quick_benchmark("latent_paths", timeout=900)
    config = report["config"]
    assert table.startswith("# Latent paths")
    predictive = report["predictive"]
    assert predictive["finite"] and predictive["seconds"] > 0
    assert predictive["shapes"]["x_states"] == [config["draws"], config["num_steps"]]
    assert predictive["shapes"]["x_forecast"] == [config["draws"], config["horizon"]]
    nuts = report["nuts"]
    # The sites leave the potential unchanged, so the chains are the same draws.
    assert report["identical_chains"]
    assert "x_states" in nuts["with"]["sites"] and "x_states" not in nuts["without"]["sites"]
    for row in nuts.values():
        assert row["seconds_per_iteration"] > 0 and row["leapfrog_steps_per_iteration"] >= 1
    accuracy = report["accuracy"]
    assert accuracy["comparisons"] == 2 * config["target_steps"]
    assert math.isfinite(accuracy["max_abs_z"])
    assert "## NUTS with and without the sites" in table
