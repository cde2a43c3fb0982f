"""The committed results tables are what each script renders from its committed JSON.

The docs quote numbers from `benchmarks/results/*.md`; these tables must be the scripts' own
rendering of the stored measurements, not hand edits. This also keeps the rendering code of
the scripts whose `--quick` runs the suite no longer repeats (`series.py` and `latent_paths.py`:
their computations are the in-process tests of `tests/numpyro/test_plate.py`,
`test_latent_paths.py` and `tests/filtering/test_smoothing.py`) under test, at no compile cost.
"""

import json
import os
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# Committed report -> the script that wrote it.
REPORTS = {
    "series": "series",
    "latent_paths": "latent_paths",
    "versus_latent_nuts": "versus_latent_nuts",
    "cost": "cost",
    "stability": "stability",
    "stress": "stress",
    "lgssm": "lgssm",
    "lgssm_100": "lgssm",
    "pm_hmc_bias": "pm_hmc_bias",
    "pmmh_costs": "pmmh_costs",
    "which_method": "which_method",
}


def _committed(name):
    return json.loads((RESULTS / f"{name}.json").read_text()), (RESULTS / f"{name}.md").read_text()


@pytest.mark.parametrize("name", REPORTS)
def test_committed_table_is_the_rendering_of_the_committed_json(
    name, benchmark_module, monkeypatch
):
    # lgssm.py sets EQX_ON_ERROR at import, as a script: keep it out of the rest of the run.
    monkeypatch.setenv("EQX_ON_ERROR", os.environ.get("EQX_ON_ERROR", "raise"))
    report, table = _committed(name)
    assert benchmark_module(REPORTS[name]).render(report) == table


def test_committed_scaling_table_is_the_rendering_of_the_committed_json():
    from benchmarks.scaling import render  # a package, not one script file

    report, table = _committed("scaling")
    assert render(report) == table
