"""The committed results tables are what each script renders from its committed JSON.

The docs quote numbers from `benchmarks/results/*.md`; these tables must be the scripts' own
rendering of the stored measurements, not hand edits. This also keeps the rendering code of
the scripts whose `--quick` runs the suite no longer repeats (`series.py` and `latent_paths.py`:
their computations are the in-process tests of `tests/numpyro/test_plate.py`,
`test_latent_paths.py` and `tests/filtering/test_smoothing.py`) under test, at no compile cost.
"""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SCRIPTS = ["series", "latent_paths", "versus_latent_nuts", "cost"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_table_is_the_rendering_of_the_committed_json(name, benchmark_module):
    report = json.loads((RESULTS / f"{name}.json").read_text())
    table = (RESULTS / f"{name}.md").read_text()
    assert benchmark_module(name).render(report) == table
