"""Bad input: wrong shapes and hyperparameters raise; degenerate clouds give finite output.

Documented behaviour (numpyro_diffres.resampling.base.prepare, _log_density.log_normalize):
particles with a non-finite coordinate get zero weight; when no log-weight is finite (all
$-\\infty$ or NaN) the weights are uniform; a collapsed cloud maps to its single point.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_diffres import resampling

N, D = 32, 2  # the shape of conftest's value_and_grad calls elsewhere: compiles are shared
# Five Monte Carlo standard deviations of a resampled mean (multinomial: sigma_w / sqrt(N))
# per coordinate: P(|z| > 5) < 1e-6 for a single draw of a consistent resampler.
MAX_Z = 5.0


def _assert_finite_output(new_particles, new_log_weights, gradients):
    assert np.all(np.isfinite(new_particles))
    assert not np.any(np.isnan(new_log_weights))
    np.testing.assert_allclose(jax.nn.logsumexp(new_log_weights), 0.0, atol=1e-5)
    for gradient in gradients:
        assert np.all(np.isfinite(gradient)), gradient


def _weighted_mean_z(new_particles, new_log_weights, particles, weights):
    """Output mean against the mean of `(particles, weights)`, in multinomial standard errors."""
    mean = weights @ particles
    variance = weights @ (particles - mean) ** 2
    output_mean = jnp.exp(new_log_weights) @ new_particles
    return np.asarray((output_mean - mean) / jnp.sqrt(variance / particles.shape[0]))


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_fewer_than_two_particles(resampler, n, transform):
    with pytest.raises(ValueError, match="at least 2 particles"):
        transform(resampler)(jax.random.key(0), jnp.zeros(n), jnp.zeros((n, D)))


@pytest.mark.parametrize(
    ("log_weights_shape", "particles_shape"),
    [((N - 1,), (N, D)), ((N + 1,), (N, D)), ((N, 1), (N, D)), ((), (N, D)), ((N,), ())],
    ids=["fewer_weights", "more_weights", "column_weights", "scalar_weights", "scalar_particles"],
)
@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_mismatched_shapes(resampler, log_weights_shape, particles_shape, transform):
    with pytest.raises(ValueError):
        transform(resampler)(
            jax.random.key(0), jnp.zeros(log_weights_shape), jnp.zeros(particles_shape)
        )


@pytest.mark.parametrize(
    "resampler",
    [
        resampling.diffusion(),
        resampling.gumbel_softmax(),
        resampling.optimal_transport(),
    ],
    ids=["diffusion", "gumbel_softmax", "optimal_transport"],
)
def test_interpolating_resamplers_reject_discrete_states(resampler):
    with pytest.raises(TypeError, match="floating point"):
        resampler(jax.random.key(0), jnp.zeros(N), jnp.arange(N))


# --- hyperparameters --------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    # (factory, keyword arguments, exception)
    (resampling.diffusion, {"num_steps": 0}, ValueError),
    (resampling.diffusion, {"num_steps": -3}, ValueError),
    (resampling.diffusion, {"num_steps": 2.5}, TypeError),
    (resampling.diffusion, {"num_steps": True}, TypeError),
    (resampling.diffusion, {"num_steps": "8"}, TypeError),
    (resampling.diffusion, {"time": 0.0}, ValueError),
    (resampling.diffusion, {"time": -1.0}, ValueError),
    (resampling.diffusion, {"time": math.nan}, ValueError),
    (resampling.diffusion, {"time": math.inf}, ValueError),
    (resampling.diffusion, {"time": True}, TypeError),
    (resampling.diffusion, {"time": "1.0"}, TypeError),
    (resampling.diffusion, {"time": None}, TypeError),
    (resampling.diffusion, {"rate": 0}, ValueError),
    (resampling.diffusion, {"rate": -0.5}, ValueError),
    (resampling.diffusion, {"rate": False}, TypeError),
    (resampling.diffusion, {"rate": "1"}, TypeError),
    (resampling.diffusion, {"jitter": -1e-6}, ValueError),
    (resampling.diffusion, {"jitter": math.nan}, ValueError),
    (resampling.diffusion, {"jitter": math.inf}, ValueError),
    (resampling.diffusion, {"jitter": True}, TypeError),
    (resampling.diffusion, {"jitter": "1e-6"}, TypeError),
    (resampling.diffusion, {"ode": "no"}, TypeError),
    (resampling.diffusion, {"integrator": "rk4"}, ValueError),
    (resampling.diffusion, {"covariance": "dense"}, ValueError),
    (resampling.soft, {"alpha": 0.0}, ValueError),
    (resampling.soft, {"alpha": -0.5}, ValueError),
    (resampling.soft, {"alpha": 1.5}, ValueError),
    (resampling.soft, {"alpha": math.nan}, ValueError),
    (resampling.soft, {"alpha": True}, TypeError),
    (resampling.soft, {"alpha": "0.5"}, TypeError),
    (resampling.soft, {"base": resampling.diffusion()}, TypeError),
    (resampling.gumbel_softmax, {"tau": 0.0}, ValueError),
    (resampling.gumbel_softmax, {"tau": -1.0}, ValueError),
    (resampling.gumbel_softmax, {"tau": math.nan}, ValueError),
    (resampling.gumbel_softmax, {"tau": math.inf}, ValueError),
    (resampling.gumbel_softmax, {"tau": True}, TypeError),
    (resampling.gumbel_softmax, {"tau": "0.3"}, TypeError),
    (resampling.optimal_transport, {"epsilon": 0.0}, ValueError),
    (resampling.optimal_transport, {"epsilon": -0.5}, ValueError),
    (resampling.optimal_transport, {"epsilon": math.nan}, ValueError),
    (resampling.optimal_transport, {"epsilon": True}, TypeError),
    (resampling.optimal_transport, {"epsilon": "0.5"}, TypeError),
    (resampling.optimal_transport, {"threshold": 0.0}, ValueError),
    (resampling.optimal_transport, {"max_iterations": 0}, ValueError),
    (resampling.optimal_transport, {"max_iterations": 10.5}, TypeError),
    (resampling.optimal_transport, {"max_iterations": True}, TypeError),
    (resampling.optimal_transport, {"implicit_gradient": "yes"}, TypeError),
    (resampling.stop_gradient, {"base": resampling.diffusion()}, TypeError),
    (resampling.stop_gradient, {"base": resampling.soft()}, TypeError),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "exception"),
    BAD_HYPERPARAMETERS,
    ids=[
        f"{f.__name__}-{next(iter(k))}={next(iter(k.values()))!r}"
        for f, k, _ in BAD_HYPERPARAMETERS
    ],
)
def test_bad_hyperparameters_raise_at_construction(factory, kwargs, exception):
    with pytest.raises(exception):
        factory(**kwargs)


def test_numpy_scalar_hyperparameters_are_accepted():
    # Hyperparameters often come from numpy grids; they are numbers like any other, and the
    # resampler built from them is the one built from the Python values.
    assert resampling.diffusion(
        num_steps=np.int64(4), time=np.float32(1.0), rate=np.float64(2.0), jitter=np.float32(0.5)
    ) == resampling.diffusion(num_steps=4, time=1.0, rate=2.0, jitter=0.5)
    assert resampling.soft(np.float32(0.5)) == resampling.soft(0.5)
    assert resampling.gumbel_softmax(np.float32(0.25)) == resampling.gumbel_softmax(0.25)
    assert resampling.optimal_transport(
        np.float32(0.5), max_iterations=np.int32(100)
    ) == resampling.optimal_transport(0.5, max_iterations=100)


# --- degenerate clouds ------------------------------------------------------------------------


def test_non_finite_particles_get_zero_weight(resampler, value_and_grad):
    rng = np.random.default_rng(10)
    particles = 5.0 + rng.standard_normal((N, D))
    log_weights = rng.standard_normal(N)
    bad = np.array([3, 5, 7])
    particles[3, 0], particles[5, 1], particles[7] = np.nan, np.inf, -np.inf
    # The bad particles get the largest weights: had they kept any (e.g. as the zero
    # placeholder the library substitutes), the output mean would move by tens of errors.
    log_weights[bad] = 4.0
    (_, (new_particles, new_log_weights)), gradients = value_and_grad(resampler)(
        jnp.asarray(log_weights), jnp.asarray(particles), jax.random.key(10)
    )
    _assert_finite_output(new_particles, new_log_weights, gradients)
    good = np.setdiff1d(np.arange(N), bad)
    weights = np.exp(log_weights[good] - log_weights[good].max())
    z = _weighted_mean_z(new_particles, new_log_weights, particles[good], weights / weights.sum())
    assert np.all(np.abs(z) <= MAX_Z), z


@pytest.mark.parametrize("value", [-np.inf, np.nan], ids=["minus_inf", "nan"])
def test_no_finite_log_weight_means_uniform_weights(resampler, value_and_grad, value):
    rng = np.random.default_rng(11)
    particles = 5.0 + rng.standard_normal((N, D)) * [1.0, 3.0]
    log_weights = jnp.full(N, value)
    (_, (new_particles, new_log_weights)), gradients = value_and_grad(resampler)(
        log_weights, jnp.asarray(particles), jax.random.key(11)
    )
    _assert_finite_output(new_particles, new_log_weights, gradients)
    z = _weighted_mean_z(new_particles, new_log_weights, particles, np.full(N, 1.0 / N))
    assert np.all(np.abs(z) <= MAX_Z), z


def test_collapsed_cloud_returns_its_point(resampler, value_and_grad):
    point = np.array([3.7, -1.2])
    particles = jnp.asarray(np.tile(point, (N, 1)))
    log_weights = jnp.asarray(np.random.default_rng(12).standard_normal(N))
    (_, (new_particles, new_log_weights)), gradients = value_and_grad(resampler)(
        log_weights, particles, jax.random.key(12)
    )
    _assert_finite_output(new_particles, new_log_weights, gradients)
    # Rounding of the N-term weighted mean and of the variance floor: N ulps of the point.
    eps = float(jnp.finfo(new_particles.dtype).eps)
    np.testing.assert_allclose(new_particles, np.tile(point, (N, 1)), rtol=N * eps, atol=N * eps)


def test_two_particles_is_enough(resampler):
    # The smallest valid cloud, where OT's implicit gradient used to raise in float32.
    log_weights = jnp.asarray([0.3, -0.4])
    particles = jnp.asarray([[0.5, -1.0], [2.0, 1.5]])

    def expectation(log_weights, particles):
        new_particles, new_log_weights = resampler(jax.random.key(13), log_weights, particles)
        return jnp.sum(jnp.exp(new_log_weights) * jnp.sum(jnp.sin(new_particles), axis=1))

    value, gradients = jax.jit(jax.value_and_grad(expectation, argnums=(0, 1)))(
        log_weights, particles
    )
    assert np.isfinite(value)
    for gradient in gradients:
        assert np.all(np.isfinite(gradient)), gradient
