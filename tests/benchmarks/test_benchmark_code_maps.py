"""Smoke test of the memory-maps benchmark (`--quick`), and the premise of the test suite's guard
(`tests/conftest.py`): compiled programs add memory maps and `jax.clear_caches()` removes them."""

import sys

import pytest

# Second tier (make test-all): a benchmark's `--quick` smoke run, a compile-bound subprocess.
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")
def test_compiled_programs_add_maps_and_clearing_the_caches_removes_them(quick_benchmark):
    report, table = quick_benchmark("code_maps")
    assert table.startswith("# Memory maps per compiled CPU program")
    assert [row["programs"] for row in report["rows"]] == ["small programs", "filter gradients"]
    small, filters = report["rows"]
    assert filters["count"] == 1 and filters["maps_after"] > 0
    # Small programs (as eager code compiles one per operation) add maps, and clearing JAX's
    # caches gives back most of them (3.2 maps per program in benchmarks/results/code_maps.md).
    added = small["maps_after"] - small["maps_before"]
    assert small["maps_per_program"] >= 1, small
    assert small["maps_after_clear_caches"] - small["maps_before"] < added / 2, small
