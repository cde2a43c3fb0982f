"""Smoke test of the gradient benchmark (`--quick`): structure, and the diagonal bias shows."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


def test_quick_run_reports_scores_and_the_diagonal_bias(quick_benchmark):
    report, table = quick_benchmark("gradients")
    assert table.startswith("# Gradient benchmark")
    assert "## Default settings target" in table and "## Speed: the resampler alone" in table
    meta = report["meta"]
    assert meta["keys"] >= 16 and "load_start" in meta and "load_end" in meta
    assert report["references"]["rotation2"]["kind"].startswith("exact")
    rows = {(r["model"], r["resampler"]): r for r in report["rows"]}
    for row in rows.values():
        assert row["non_finite"] == 0, row
        for field in ("score_mean", "score_se", "log_likelihood_mean", "log_likelihood_se"):
            assert math.isfinite(row[field]), (field, row)
        assert row["score_se"] > 0
    default = rows[("rotation2", "diffusion (default)")]
    diagonal = rows[("rotation2", "diffusion diagonal")]
    # The quick run (2-D rotating model, N = 64, 32 keys) must either show the diagonal
    # setting's bias beyond two standard errors, or have the default within its target.
    assert abs(diagonal["bias_in_se"]) > 2.0 or default["meets_target"], (default, diagonal)
    checks = {c["resampler"] for c in report["default_checks"] if c["model"] == "rotation2"}
    assert checks == {"diffusion (default)", "diffusion diagonal"}
    speed = {(r["d"], r["setting"]) for r in report["speed"]}
    assert {(d, s) for d in (1, 4) for s in ("default (auto)", "diagonal", "full")} <= speed
    for row in report["speed"]:
        assert row["forward_ms"] > 0 and row["gradient_ms"] > 0
