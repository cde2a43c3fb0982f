"""Smoke tests of the benchmark scripts (`--quick`): they run and report numbers."""

import math

import pytest

# Second tier (make test-all): benchmark `--quick` smoke runs, compile-bound subprocesses.
pytestmark = pytest.mark.slow

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


def test_quick_benchmark_reports_finite_numbers(quick_benchmark):
    report, table = quick_benchmark("resampling")
    assert table.startswith("# Resampler benchmark")

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


SCALING_SECTIONS = ("nuts", "gradient", "resampler", "accuracy", "precision")


def test_quick_scaling_benchmark_covers_every_section(quick_benchmark):
    report, markdown = quick_benchmark("scaling", timeout=600)
    assert markdown.startswith("# Scaling benchmark")
    assert set(SCALING_SECTIONS) <= set(report)
    assert "Claim 'at equal resampled-mean error" in markdown

    def positive(value):
        return math.isfinite(value) and value > 0

    assert all(positive(row["seconds"]) for row in report["nuts"])
    assert {row.get("dtype") for row in report["nuts"][1:]} == {"float32", "mixed"}
    mixed = next(row for row in report["nuts"] if row.get("dtype") == "mixed")
    # float64 NUTS over a filter with float32 particles.
    assert mixed["sample_dtype"] == "float64"
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
    precision = report["precision"]
    assert {row["mode"] for row in precision} == {
        "float64",
        "float32, same noise",
        "mixed: float32 particles, float64 densities",
        "float32, x64 disabled",
    }
    for row in precision:
        assert positive(row["value_and_grad_ms"]) and math.isfinite(row["sd"]), row
        if row["mode"] in ("float32, same noise", "mixed: float32 particles, float64 densities"):
            # Same noise: rounding error only (the bar is 1e-4 relative).
            assert row["max_same_key_relative_difference"] < 1e-4, row


def test_quick_pm_hmc_bias_reports_every_row(quick_benchmark):
    report, markdown = quick_benchmark("pm_hmc_bias")
    assert markdown.startswith("# Pseudo-marginal HMC")
    rows = report["rows"]
    expected = [("kalman", None)] + [
        (method, n) for n in report["config"]["num_particles"] for method in ("pm_hmc", "fixed_key")
    ]
    assert [(row["method"], row["N"]) for row in rows] == expected
    for row in rows:
        for field in ("mean", "sd", "bias_in_sd", "mcse_in_sd", "ess"):
            assert math.isfinite(row[field]), (field, row)
    assert 0.0 < report["exact"]["sd"] < 1.0


def test_quick_pmmh_costs_splits_fixed_and_per_iteration_seconds(quick_benchmark):
    report, markdown = quick_benchmark("pmmh_costs")
    assert markdown.startswith("# PMMH: fixed costs")
    result = report["result"]
    # Compiling a loop costs more than running one of its iterations.
    assert 0.0 < result["per_iteration"] < result["sampling_compile"]
    assert result["start_and_warmup_compile"] > result["per_iteration"]
