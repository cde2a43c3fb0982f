"""`tools/code_maps.py`: its smoke run (`--quick`) checks the premise of the test suite's guard
(`tests/conftest.py`): compiled programs add memory maps and `jax.clear_caches()` removes them.
Its committed table is the rendering of its committed JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.mark.slow  # second tier: a compile-bound subprocess smoke run
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")
def test_compiled_programs_add_maps_and_clearing_the_caches_removes_them(
    tmp_path, compile_fast_env
):
    out = tmp_path / "code_maps.json"
    completed = subprocess.run(
        [sys.executable, str(TOOLS / "code_maps.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=compile_fast_env(),
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report, table = json.loads(out.read_text()), out.with_suffix(".md").read_text()
    assert table.startswith("# Memory maps per compiled CPU program")
    assert [row["programs"] for row in report["rows"]] == ["small programs", "filter gradients"]
    small, filters = report["rows"]
    assert filters["count"] == 1 and filters["maps_after"] > 0
    # Small programs (as eager code compiles one per operation) add maps, and clearing JAX's
    # caches gives back most of them (3.2 maps per program in tools/results/code_maps.md).
    added = small["maps_after"] - small["maps_before"]
    assert small["maps_per_program"] >= 1, small
    assert small["maps_after_clear_caches"] - small["maps_before"] < added / 2, small


def test_committed_table_is_the_rendering_of_the_committed_json():
    report = json.loads((TOOLS / "results" / "code_maps.json").read_text())
    table = (TOOLS / "results" / "code_maps.md").read_text()
    assert load_script(TOOLS / "code_maps.py", "tool_code_maps").render(report) == table
