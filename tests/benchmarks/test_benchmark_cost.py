"""Smoke test of the per-gradient cost benchmark (`--quick`): every variant is timed."""

import math

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


def test_quick_run_times_every_variant(quick_benchmark):
    report, table = quick_benchmark("cost")
    assert table.startswith("# Per-gradient cost")
    rows = report["rows"]
    variants = report["meta"]["variants"]
    assert len(variants) == 6 and {"default", "checkpoint"} <= set(variants)
    assert [row["variant"] for row in rows] == variants
    for row in rows:
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        assert row["hlo_instructions"] > 0, row
    # Rematerialising every step adds instructions to the compiled gradient.
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["checkpoint"]["hlo_instructions"] > by_variant["default"]["hlo_instructions"]
    # The compiler-settings section: one fresh process per XLA setting (one under --quick).
    (setting,) = report["compiler_settings"]["rows"]
    assert setting["setting"] == "XLA defaults" and setting["XLA_FLAGS"] == ""
    assert setting["compile_s"] > 0 and math.isfinite(setting["ms"]) and setting["ms"] > 0
    # One round under --quick: the median over rounds is that round, its range one point.
    assert setting["rounds"] == 1 and setting["ms_range"] == [setting["ms"], setting["ms"]]
    assert "## Compiler settings" in table
