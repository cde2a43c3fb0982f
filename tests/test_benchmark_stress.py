"""Smoke test of the stress benchmark (`--quick`): it runs, classifies and reports."""

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stress.py"


def _load():
    spec = importlib.util.spec_from_file_location("stress", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outcomes_are_classified():
    stress = _load()
    ok = {"log_likelihood": -3.0, "gradient_finite": True, "data_finite": True}
    assert stress.classify(ok) == "ok"
    assert stress.classify({**ok, "log_likelihood": math.nan}) == "nan"
    assert stress.classify({**ok, "log_likelihood": math.inf}) == "+inf"
    assert stress.classify({**ok, "gradient_finite": False}) == "gradient non-finite"
    assert stress.classify({**ok, "log_likelihood": -math.inf}) == "-inf expected finite"
    invalid = {**ok, "log_likelihood": -math.inf, "data_finite": False}
    assert stress.classify(invalid) == "-inf (invalid data)"
    assert stress.classify({"index": 0, "error": "ValueError: x"}) == "crash"
    assert stress.classify({"index": 0, "hang": True}) == "hang"
    assert set(stress.BUGS) < set(stress.OUTCOMES)


def test_quick_run_reports_every_case(quick_benchmark):
    report, table = quick_benchmark("stress")
    assert table.startswith("# Stress test")
    cases = report["config"]["cases"]
    assert len(report["cases"]) == cases > 0
    assert sum(report["summary"]["total"].values()) == cases
    # The quick structures are benign (Gaussian, T = 8, N = 8): every case must be ok.
    assert report["summary"]["bugs"] == 0, report["findings"]
    for case in report["cases"]:
        assert case["outcome"] == "ok", case
        assert math.isfinite(case["log_likelihood"]) and math.isfinite(case["gradient_norm"])
