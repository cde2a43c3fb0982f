"""The committed results tables are what each script renders from its committed JSON.

The docs quote numbers from `benchmarks/results/*.md`; these tables must be the scripts' own
rendering of the stored measurements, not hand edits. This also keeps the rendering code of
the scripts whose `--quick` runs the suite no longer repeats (`series.py` and `latent_paths.py`:
their computations are the in-process tests of `tests/numpyro/test_plate.py`,
`test_latent_paths.py` and `tests/filtering/test_smoothing.py`) under test, at no compile cost.
"""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"
SCRIPTS = ["series", "latent_paths", "versus_latent_nuts", "cost", "code_maps"]


def load(name):
    # Some scripts switch float64 on at import, as a script would: keep the suite's dtype.
    previous = jax.config.jax_enable_x64
    try:
        spec = importlib.util.spec_from_file_location(
            f"benchmark_{name}", BENCHMARKS / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        jax.config.update("jax_enable_x64", previous)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_table_is_the_rendering_of_the_committed_json(name):
    report = json.loads((RESULTS / f"{name}.json").read_text())
    table = (RESULTS / f"{name}.md").read_text()
    assert load(name).render(report) == table
