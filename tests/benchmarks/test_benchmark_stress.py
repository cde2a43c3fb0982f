"""Smoke test of the stress benchmark (`--quick`): it runs, classifies and reports."""

import math

import pytest


def test_outcomes_are_classified(benchmark_module):
    stress = benchmark_module("stress")
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


@pytest.mark.slow
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


def test_the_case_that_gave_a_non_finite_ot_gradient_now_gives_a_finite_one(benchmark_module):
    # Case 525 of the committed 1000-case run (optimal transport, implicit gradient, float32,
    # Student-t emission, 3-d state): its gradient was NaN before the OT resampler dropped
    # non-finite implicit cotangents; the unrolled gradient was finite.
    import jax
    import jax.numpy as jnp
    import numpy as np

    import numpyro_diffres as ndr

    stress = benchmark_module("stress")
    rng = np.random.default_rng(0)
    cases = [stress.draw_case(rng, i, stress.STRUCTURES, stress.RESAMPLERS) for i in range(526)]
    case = cases[525]
    assert (case["emission"], case["resampler"]) == ("student", "optimal_transport")
    model = stress._build(case["emission"])
    params = {k: jnp.asarray(v, jnp.float32) for k, v in case["params"].items()}
    data_key, filter_key = jax.random.split(jax.random.PRNGKey(case["seed"]))
    _, observations = ndr.simulate(data_key, model(params), 20)

    def log_likelihood(params, resampler):
        return ndr.particle_filter(
            filter_key, model(params), observations, num_particles=32, resampler=resampler
        ).log_likelihood

    implicit = ndr.resampling.optimal_transport()
    value, gradient = jax.jit(jax.value_and_grad(lambda p: log_likelihood(p, implicit)))(params)
    assert np.isfinite(float(value))
    for name, leaf in gradient.items():
        assert np.all(np.isfinite(np.asarray(leaf))), name
    # The implicit gradient leaves the forward value alone: the unrolled filter gives it too,
    # up to how XLA compiles the two programs (bitwise with full optimisation; about 1e-5
    # apart under the suite's low-optimisation flags, conftest.py).
    unrolled = ndr.resampling.optimal_transport(implicit_gradient=False)
    unrolled_value = float(jax.jit(lambda p: log_likelihood(p, unrolled))(params))
    assert math.isclose(float(value), unrolled_value, rel_tol=1e-4), (value, unrolled_value)
