"""One bad value gets one error type and message from every entry point (_validation)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from numpyro_diffres import _validation, diagnostics, resampling

KEY = jax.random.PRNGKey(0)
MODEL = ndr.StateSpaceModel(
    initial=dist.Normal(0.0, 1.0),
    transition=lambda x, t: dist.Normal(0.9 * x, 0.5),
    emission=lambda x, t: dist.Normal(x, 0.3),
)
Y = jnp.zeros(3)

# Each entry point takes one count; the lambdas pass it where that entry point expects it.
COUNT_ENTRY_POINTS = {
    "particle_filter": lambda n: ndr.particle_filter(KEY, MODEL, Y, num_particles=n),
    "simulate": lambda n: ndr.simulate(KEY, MODEL, n),
    "diffusion": lambda n: resampling.diffusion(num_steps=n),
    "optimal_transport": lambda n: resampling.optimal_transport(0.5, max_iterations=n),
}


@pytest.mark.parametrize("entry", list(COUNT_ENTRY_POINTS))
def test_numpy_integers_are_counts(entry):
    COUNT_ENTRY_POINTS[entry](np.int64(4))


@pytest.mark.parametrize("entry", list(COUNT_ENTRY_POINTS))
@pytest.mark.parametrize("value", [4.0, True, "4", np.float32(4.0)])
def test_a_non_integer_count_is_a_type_error_everywhere(entry, value):
    with pytest.raises(TypeError, match=r"must be an int >= \d, got"):
        COUNT_ENTRY_POINTS[entry](value)


@pytest.mark.parametrize("entry", list(COUNT_ENTRY_POINTS))
def test_a_too_small_count_is_a_value_error_everywhere(entry):
    with pytest.raises(ValueError, match=r"must be >= \d, got -3"):
        COUNT_ENTRY_POINTS[entry](-3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ndr.particle_filter(KEY, MODEL, Y, num_particles=4, resampler="diffusion"),
        lambda: resampling.adaptive("diffusion", 0.5),
    ],
)
def test_a_non_callable_resampler_is_one_type_error(call):
    with pytest.raises(TypeError, match=r"resampler must be callable as resampler\(key"):
        call()


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_thresholds_outside_the_unit_interval(threshold):
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        ndr.particle_filter(KEY, MODEL, Y, num_particles=4, ess_threshold=threshold)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        resampling.adaptive(resampling.systematic(), threshold)


def test_adaptive_never_and_always():
    log_weights = jnp.log(jnp.array([0.7, 0.1, 0.1, 0.1]))
    particles = jnp.arange(4.0)
    inner = resampling.systematic()
    assert resampling.adaptive(inner, 1.0) is inner
    kept, kept_log_weights = resampling.adaptive(inner, 0.0)(KEY, log_weights, particles)
    np.testing.assert_array_equal(kept, particles)
    np.testing.assert_array_equal(kept_log_weights, log_weights)
    # ESS = 1 / sum w^2 = 1.92: resampled below a threshold of 0.5 * 4 = 2, kept below 0.25 * 4.
    resampled, _ = resampling.adaptive(inner, 0.5)(KEY, log_weights, particles)
    np.testing.assert_array_equal(resampled, inner(KEY, log_weights, particles)[0])
    assert not np.array_equal(resampled, particles)
    kept, _ = resampling.adaptive(inner, 0.25)(KEY, log_weights, particles)
    np.testing.assert_array_equal(kept, particles)


# --- the checks moved in from the resamplers, samplers and diagnostics ------------------------
# Each message is matched whole (re.escape): the same bad value must read the same everywhere.


def _constant(key, params):
    return jnp.sum(params["a"]) * 0.0


def _surface(**kwargs):
    return diagnostics.surface(KEY, kwargs.pop("fn", _constant), {"a": jnp.ones(2)}, **kwargs)


def _nuts(**kwargs):
    return ndr.blackjax_nuts(KEY, kwargs.pop("model", lambda: None), **kwargs)


# (call, error, whole message) for one bad value each.
BAD_ARGUMENTS = {
    "soft alpha 0": (
        lambda: resampling.soft(0.0),
        ValueError,
        "alpha must lie in (0, 1], got 0.0.",
    ),
    "soft alpha str": (
        lambda: resampling.soft("0.5"),
        TypeError,
        "alpha must be a number in (0, 1], got '0.5'.",
    ),
    "target_accept 1": (
        lambda: _nuts(target_accept=1.0),
        ValueError,
        "target_accept must lie in (0, 1), got 1.0.",
    ),
    "target_accept 0": (
        lambda: _nuts(target_accept=0),
        ValueError,
        "target_accept must lie in (0, 1), got 0.",
    ),
    "target_accept bool": (
        lambda: _nuts(target_accept=True),
        TypeError,
        "target_accept must be a number in (0, 1), got True.",
    ),
    "decay factor": (
        lambda: resampling.gradient_decay(resampling.systematic(), 1.5),
        ValueError,
        "factor must lie in [0, 1] (1 keeps the full gradient, 0 stops it through the "
        "particle history); got 1.5.",
    ),
    "decay factor str": (
        lambda: resampling.gradient_decay(resampling.systematic(), "1"),
        TypeError,
        "factor must be a number in [0, 1], got '1'.",
    ),
    "jitter negative": (
        lambda: resampling.diffusion(jitter=-1e-3),
        ValueError,
        "jitter must be a non-negative number, got -0.001.",
    ),
    "jitter infinite": (
        lambda: resampling.diffusion(jitter=float("inf")),
        ValueError,
        "jitter must be a non-negative number, got inf.",
    ),
    "jitter bool": (
        lambda: resampling.diffusion(jitter=False),
        TypeError,
        "jitter must be a non-negative number, got False.",
    ),
    "ode int": (
        lambda: resampling.diffusion(ode=1),
        TypeError,
        "ode must be a bool, got 1.",
    ),
    "implicit_gradient None": (
        lambda: resampling.optimal_transport(0.5, implicit_gradient=None),
        TypeError,
        "implicit_gradient must be a bool, got None.",
    ),
    "integrator": (
        lambda: resampling.diffusion(integrator="heun"),
        ValueError,
        "integrator must be one of ('exponential', 'euler'), got 'heun'.",
    ),
    "covariance": (
        lambda: resampling.diffusion(covariance="dense"),
        ValueError,
        "covariance must be one of ('auto', 'diagonal', 'full'), got 'dense'.",
    ),
    "decay resampler": (
        lambda: resampling.gradient_decay("diffusion", 0.5),
        TypeError,
        "gradient_decay(resampler, factor) needs a resampler callable as "
        "resampler(key, log_weights, particles), e.g. diffusion(); got 'diffusion'.",
    ),
    "soft base": (
        lambda: resampling.soft(0.5, base=resampling.gumbel_softmax()),
        TypeError,
        f"soft(base=...) needs an index resampler; got {resampling.gumbel_softmax()!r}.",
    ),
    "stop_gradient base": (
        lambda: resampling.stop_gradient("systematic"),
        TypeError,
        "stop_gradient(base) needs an index resampler such as systematic(), multinomial() "
        "or stratified(); got 'systematic'.",
    ),
    "nuts model": (
        lambda: _nuts(model=3),
        TypeError,
        "model must be a callable NumPyro model, got 3.",
    ),
    "marginal model": (
        lambda: diagnostics.choose_marginal_num_particles(KEY, "model", {}),
        TypeError,
        "model must be a callable NumPyro program, got 'model'.",
    ),
    "log_likelihood_fn": (
        lambda: _surface(fn=None),
        TypeError,
        "log_likelihood_fn must be callable as log_likelihood_fn(key, params) -> scalar; got None.",
    ),
    "model_fn": (
        lambda: diagnostics.filter_surface(KEY, 1, Y, 0.8, num_particles=8),
        TypeError,
        "model_fn must be callable as model_fn(params) -> StateSpaceModel; got 1.",
    ),
    "radius bool": (
        lambda: _surface(radius=True),
        TypeError,
        "radius must be a positive number, got True.",
    ),
    "radius infinite": (
        lambda: _surface(radius=float("inf")),
        ValueError,
        "radius must be positive and finite, got inf.",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_each_bad_argument_gets_its_one_message(case):
    call, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: resampling.soft(1.0),
        lambda: resampling.gradient_decay(resampling.systematic(), 0.0),
        lambda: resampling.gradient_decay(resampling.systematic(), 1),
        lambda: resampling.diffusion(jitter=0),
        lambda: resampling.diffusion(ode=np.bool_(False), time=np.float32(1.0)),
        lambda: resampling.optimal_transport(0.5, implicit_gradient=np.bool_(True)),
        lambda: resampling.soft(np.float32(0.5), base=resampling.stratified()),
        lambda: resampling.stop_gradient(resampling.multinomial()),
    ],
)
def test_values_at_the_edges_and_numpy_scalars_are_accepted(call):
    call()


def test_resamplers_store_plain_python_values():
    # NumPy scalars are converted, so a resampler compares and hashes like its defaults.
    built = resampling.diffusion(ode=np.bool_(True), jitter=np.float64(1e-6))
    assert built == resampling.diffusion()
    assert type(built.ode) is bool and type(built.jitter) is float
    assert type(resampling.soft(np.float32(0.5)).alpha) is float


@pytest.mark.parametrize(
    ("keywords", "interval"),
    [
        ({}, "[0, 1]"),
        ({"include_zero": False}, "(0, 1]"),
        ({"include_one": False}, "[0, 1)"),
        ({"include_zero": False, "include_one": False}, "(0, 1)"),
    ],
)
def test_check_fraction_ends(keywords, interval):
    closed_at_zero, closed_at_one = interval[0] == "[", interval[-1] == "]"
    for value, inside in [(0, closed_at_zero), (1.0, closed_at_one), (0.5, True), (-0.1, False)]:
        if inside:
            assert _validation.check_fraction("x", value, **keywords) == float(value)
        else:
            with pytest.raises(ValueError, match=re.escape(f"x must lie in {interval}, got")):
                _validation.check_fraction("x", value, **keywords)
