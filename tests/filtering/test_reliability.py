"""The filter and the factor under hostile inputs, and their determinism.

Defined behaviour (numpyro_diffres.filtering): an observation or parameter that makes every
particle impossible gives a log-likelihood of $-\\infty$ with a gradient of exactly zero, never
NaN; invalid *concrete* parameters under NumPyro's validation raise NumPyro's own error.
tests/filtering/test_filtering_input.py covers zero/negative Normal scales in the transition and the
emission, NaN observations and a bounded emission in `particle_filter`; this file covers the
rest: infinite and huge observations, the initial distribution, non-Gaussian families at and
beyond their support, overflowing and underflowing parameters, the same through
`particle_factor` inside NumPyro's potential energy, and determinism.

All parameters are traced arguments, so each model family compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import seed
from numpyro.infer.util import log_density, potential_energy

import numpyro_diffres as ndr

T, N = 12, 16
KEY = jax.random.PRNGKey(0)
OBSERVATIONS = jnp.sin(jnp.arange(T, dtype=jnp.float32) / 3.0)
COUNTS = jnp.round(3.0 * jnp.abs(OBSERVATIONS))
# (phi, q, r, s0): AR(1) coefficient, transition scale, emission scale, initial scale.
GOOD = jnp.array([0.8, 0.5, 0.5, 1.0])


def gaussian_model(params):
    phi, q, r, s0 = params
    return ndr.StateSpaceModel(
        dist.Normal(0.0, s0),
        lambda x, t: dist.Normal(phi * x, q),
        lambda x, t: dist.Normal(x, r),
    )


def poisson_model(params):
    # Log-intensity state; `r` is the intensity's multiplier (its support is rate >= 0).
    phi, q, r, s0 = params
    return ndr.StateSpaceModel(
        dist.Normal(0.0, s0),
        lambda x, t: dist.Normal(phi * x, q),
        lambda x, t: dist.Poisson(r * jnp.exp(x)),
    )


def student_model(params):
    # `r` is the degrees of freedom (support: > 0).
    phi, q, r, s0 = params
    return ndr.StateSpaceModel(
        dist.Normal(0.0, s0),
        lambda x, t: dist.Normal(phi * x, q),
        lambda x, t: dist.StudentT(r, x, 0.5),
    )


MODELS = {"gaussian": gaussian_model, "poisson": poisson_model, "student": student_model}


@functools.cache
def value_and_grad(family):
    """Jitted `(params, observations) -> ((log_likelihood, increments), d/d params)`."""

    def log_likelihood(params, observations):
        result = ndr.particle_filter(KEY, MODELS[family](params), observations, num_particles=N)
        return result.log_likelihood, result.log_likelihood_increments

    return jax.jit(jax.value_and_grad(log_likelihood, has_aux=True))


def assert_impossible(family, params, observations, step=None):
    (value, increments), gradient = value_and_grad(family)(jnp.asarray(params), observations)
    assert value == -jnp.inf
    # Defined behaviour: exactly zero, so NUTS rejects the point without a NaN trajectory.
    np.testing.assert_array_equal(gradient, np.zeros(4))
    if step is not None:
        assert increments[step] == -jnp.inf
        assert np.all(np.isfinite(increments[:step]))


# --- observations -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 5, T - 1])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
@pytest.mark.parametrize("family", ["gaussian", "student"])
def test_infinite_observation_is_impossible(family, value, step):
    assert_impossible(family, GOOD, OBSERVATIONS.at[step].set(value), step)


@pytest.mark.parametrize("value", [np.inf, -1.0, 2.5])
def test_count_outside_the_poisson_support_is_impossible(value):
    assert_impossible("poisson", GOOD, COUNTS.at[5].set(value), 5)


@pytest.mark.parametrize("value", [1e30, -1e30])
@pytest.mark.parametrize("family", ["gaussian", "student"])
def test_huge_observation(family, value):
    # In float32 the squared residual (1e60) overflows: -inf, gradient 0. In float64 it is a
    # finite, enormous penalty (Gaussian: -(1e30)^2 / (2 * 0.25) = -2e60 at that step).
    (log_likelihood, _), gradient = value_and_grad(family)(GOOD, OBSERVATIONS.at[5].set(value))
    assert np.all(np.isfinite(gradient))
    # (Compared as Python floats: -1e59 itself is -inf in float32.)
    if family == "gaussian":
        assert float(log_likelihood) < -1e59
    else:
        # Student-t: -(nu + 1)/2 log(1 + (y/s)^2 / nu) with nu = 0.5 is about -1.5 * 138.
        assert float(log_likelihood) < -150.0
    if log_likelihood == -jnp.inf:
        np.testing.assert_array_equal(gradient, np.zeros(4))


# --- parameters at and beyond the support -----------------------------------------------------

# (family, index into (phi, q, r, s0), value). test_filtering_input.py has q, r in {0, -0.5}.
IMPOSSIBLE_PARAMETERS = [
    ("gaussian", 3, 0.0),  # initial scale at the boundary
    ("gaussian", 3, -1.0),  # initial scale beyond it
    ("gaussian", 2, np.nan),
    ("gaussian", 2, np.inf),
    ("gaussian", 0, 1e20),  # explosive transition: the states overflow
    ("poisson", 2, 0.0),  # rate 0 with counts > 0: xlogy(0, 0) has a NaN derivative
    ("poisson", 2, -1.0),
    ("student", 2, 0.0),
    ("student", 2, -1.0),
]


@pytest.mark.parametrize(
    ("family", "index", "value"),
    IMPOSSIBLE_PARAMETERS,
    ids=[f"{f}-{'phi q r s0'.split()[i]}={v}" for f, i, v in IMPOSSIBLE_PARAMETERS],
)
def test_impossible_parameters_give_minus_infinity_and_zero_gradient(family, index, value):
    observations = COUNTS if family == "poisson" else OBSERVATIONS
    assert_impossible(family, GOOD.at[index].set(value), observations)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_state_coefficient_gives_minus_infinity(value):
    # Documented limit: a non-finite parameter that multiplies the state inside the user's
    # transition (loc = phi * x) gives -inf, but the gradient with respect to the *other*
    # parameters is NaN: the backward pass of the user's own product computes 0 * phi for x.
    # No library-side guard can reach inside that closure; NUTS never proposes such a point.
    (log_likelihood, _), gradient = value_and_grad("gaussian")(GOOD.at[0].set(value), OBSERVATIONS)
    assert log_likelihood == -jnp.inf
    assert gradient[0] == 0.0


def test_underflowing_scale_is_impossible_not_nan():
    # A valid but tiny emission scale: in float32 r^2 = 1e-60 underflows to 0 and every
    # log-density is -inf; in float64 it is finite and enormous. Never NaN.
    (log_likelihood, _), gradient = value_and_grad("gaussian")(GOOD.at[2].set(1e-30), OBSERVATIONS)
    assert float(log_likelihood) < -1e50
    assert np.all(np.isfinite(gradient))


def test_valid_parameters_still_have_the_pathwise_gradient():
    # The guards must not touch a healthy point: the gradient is finite and not zero.
    (log_likelihood, _), gradient = value_and_grad("gaussian")(GOOD, OBSERVATIONS)
    assert np.isfinite(log_likelihood)
    assert np.all(np.isfinite(gradient)) and np.all(gradient != 0.0)


# --- the same through particle_factor and NumPyro's potential energy -------------------------


def numpyro_model(observations, emission="normal"):
    # A deliberately careless prior: a Normal on the transition scale proposes q <= 0.
    q = numpyro.sample("q", dist.Normal(0.5, 1.0))
    if emission == "normal":
        emit = lambda x, t: dist.Normal(x, 0.5)  # noqa: E731
    else:
        emit = lambda x, t: dist.Uniform(x - 1.0, x + 1.0)  # noqa: E731  bounded support
    model = ndr.StateSpaceModel(dist.Normal(0.0, 1.0), lambda x, t: dist.Normal(0.8 * x, q), emit)
    ndr.particle_factor("y", model, observations, num_particles=N)


@functools.cache
def potential(emission):
    """Jitted `(q, observations) -> (U, dU/dq)`, U the potential energy (-log density)."""

    def energy(q, observations):
        return potential_energy(seed(numpyro_model, 1), (observations, emission), {}, {"q": q})

    return jax.jit(jax.value_and_grad(energy))


def prior_gradient(q):
    return jax.grad(lambda q: -dist.Normal(0.5, 1.0).log_prob(q))(q)


@pytest.mark.parametrize("q", [0.0, -0.5])
def test_factor_with_impossible_parameter(q):
    energy, gradient = potential("normal")(jnp.float32(q), OBSERVATIONS)
    assert energy == jnp.inf
    # The factor contributes exactly zero: only the prior's gradient remains.
    np.testing.assert_allclose(gradient, prior_gradient(q), rtol=1e-6)


def test_factor_with_every_particle_impossible_at_one_step():
    # Uniform(x - 1, x + 1) emission and an observation no particle can reach at t = 5.
    energy, gradient = potential("uniform")(jnp.float32(0.5), OBSERVATIONS.at[5].set(100.0))
    assert energy == jnp.inf
    np.testing.assert_allclose(gradient, prior_gradient(0.5), rtol=1e-6)
    # The same model without the unreachable observation is finite. Its gradient is the
    # prior's too, but for another reason: the Uniform emission's density is flat inside its
    # support, so the filter's estimate does not move with q. (This once compared
    # `gradient != prior_gradient(0.5)` and passed only on a rounding error of 3e-9.)
    energy, gradient = potential("uniform")(jnp.float32(0.7), OBSERVATIONS)
    assert np.isfinite(energy) and energy > -dist.Normal(0.5, 1.0).log_prob(0.7)
    np.testing.assert_allclose(gradient, prior_gradient(0.7), rtol=1e-6)


def test_concrete_invalid_parameter_raises_under_validation():
    # Outside jit the parameter is concrete and NumPyro's own validation speaks.
    with numpyro.validation_enabled(True):
        with pytest.raises(ValueError, match="Normal distribution got invalid scale parameter"):
            log_density(seed(numpyro_model, 1), (OBSERVATIONS,), {}, {"q": jnp.float32(-0.5)})


def test_traced_invalid_parameter_does_not_raise_under_validation():
    # Under jit (as under NUTS) NumPyro cannot check; the filter gives -inf instead.
    with numpyro.validation_enabled(True):
        energy, gradient = jax.jit(
            jax.value_and_grad(
                lambda q: potential_energy(seed(numpyro_model, 1), (OBSERVATIONS,), {}, {"q": q})
            )
        )(jnp.float32(-0.5))
    assert energy == jnp.inf and np.isfinite(gradient)


# --- determinism ------------------------------------------------------------------------------

# Short series: eager (op-by-op) execution is slow, and every determinism check shares one
# compile of this length.
SHORT = OBSERVATIONS[:4]
# Eager vs jit (and batched vs looped) differ only by rounding: XLA fuses and reorders the
# float32 arithmetic. Each of the T steps composes K = 8 integrator steps of N-term sums whose
# rounding is at most N eps relative, so the accumulated relative difference is at most about
# T K N eps = 4 * 8 * 16 * 1.2e-7 = 6e-5 (diffusion resampling is smooth in its inputs, so no
# index flip amplifies it).
ROUNDING = SHORT.shape[0] * 8 * N * float(jnp.finfo(jnp.float32).eps)


def _filter(params, key, observations=SHORT):
    result = ndr.particle_filter(key, gaussian_model(params), observations, num_particles=N)
    return result.log_likelihood, result.log_likelihood_increments


_filter_jit = jax.jit(jax.value_and_grad(_filter, has_aux=True))


def _assert_bitwise_equal(first, second):
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_key_gives_bitwise_identical_results_jitted():
    _assert_bitwise_equal(_filter_jit(GOOD, KEY), _filter_jit(GOOD, KEY))


def test_same_key_gives_bitwise_identical_results_eager():
    eager = jax.value_and_grad(_filter, has_aux=True)
    with jax.disable_jit():
        first = eager(GOOD, KEY)
        second = eager(GOOD, KEY)
    _assert_bitwise_equal(first, second)
    (value, increments), gradient = _filter_jit(GOOD, KEY)
    (eager_value, eager_increments), eager_gradient = first
    np.testing.assert_allclose(eager_value, value, rtol=ROUNDING)
    np.testing.assert_allclose(eager_increments, increments, rtol=ROUNDING, atol=ROUNDING)
    np.testing.assert_allclose(eager_gradient, gradient, rtol=ROUNDING, atol=ROUNDING)


def test_vmap_over_parameters_matches_a_loop():
    grid = GOOD + jnp.linspace(-0.2, 0.2, 4)[:, None] * jnp.array([1.0, 0.5, 0.5, 0.5])
    batched = jax.jit(jax.vmap(lambda p: _filter(p, KEY)[0]))(grid)
    looped = np.array([_filter_jit(p, KEY)[0][0] for p in grid])
    np.testing.assert_allclose(batched, looped, rtol=ROUNDING)
    assert len(np.unique(np.asarray(batched))) == 4  # the parameters matter


def test_factor_is_deterministic_per_seed_and_varies_across_seeds():
    @jax.jit
    def density(key):
        value, _ = log_density(seed(numpyro_model, key), (SHORT,), {}, {"q": 0.5})
        return value

    keys = [jax.random.PRNGKey(s) for s in (0, 1, 2, 3)]
    np.testing.assert_array_equal(density(keys[3]), density(keys[3]))
    values = [float(density(k)) for k in keys]
    assert len(set(values)) == 4, values


def test_optimal_transport_drops_a_non_finite_implicit_cotangent_whole():
    from numpyro_diffres.resampling.optimal_transport import _finite_gradient_or_none

    log_weights, particles = jnp.zeros(3), jnp.ones((3, 2))

    def pulled(cotangents):
        _, vjp = jax.vjp(_finite_gradient_or_none, log_weights, particles)
        return vjp(cotangents)

    finite = (jnp.arange(3.0), jnp.full((3, 2), 2.0))
    for got, expected in zip(pulled(finite), finite, strict=True):
        assert jnp.array_equal(got, expected)
    poisoned = (jnp.arange(3.0), jnp.full((3, 2), 2.0).at[1, 0].set(jnp.nan))
    for got in pulled(poisoned):
        assert jnp.array_equal(got, jnp.zeros_like(got))
