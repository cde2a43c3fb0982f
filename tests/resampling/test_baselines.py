"""Gradients of the baseline resamplers and the optimal-transport diagnostics.

* Gumbel-softmax, soft and OT resampling are differentiable: finite, non-zero gradients, and
  OT's (implicit or unrolled) gradient matches central finite differences in float64.
* Stop-gradient resampling returns uniform log-weights that carry the score-function gradient;
  averaged over keys it is unbiased for the gradient of the weighted expectation, where naive
  autodiff through index resampling (the canary) gives exactly zero.
* OT reports non-convergence instead of hiding it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax

from numpyro_diffres import resampling

DIFFERENTIABLE = {
    "gumbel_softmax": resampling.gumbel_softmax(0.3),
    "soft": resampling.soft(0.5),
    "optimal_transport_implicit": resampling.optimal_transport(),
    "optimal_transport_unrolled": resampling.optimal_transport(implicit_gradient=False),
}


def _cloud(n, d, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(n)), jnp.asarray(rng.standard_normal((n, d)))


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_baselines_have_finite_nonzero_gradients(name, value_and_grad):
    log_weights, particles = _cloud(32, 2, seed=1)
    (_, (new_particles, _)), (grad_log_weights, grad_particles) = value_and_grad(
        DIFFERENTIABLE[name]
    )(log_weights, particles, jax.random.key(1))
    assert np.all(np.isfinite(new_particles))
    for gradient in (grad_log_weights, grad_particles):
        assert np.all(np.isfinite(gradient)) and np.any(gradient != 0), gradient


@pytest.mark.parametrize("implicit_gradient", [True, False])
@pytest.mark.fixed_precision
def test_optimal_transport_gradient_matches_finite_differences(implicit_gradient):
    n, d = 16, 2
    with jax.enable_x64(True):
        log_weights, particles = _cloud(n, d, seed=2)
        # A tight threshold so the forward map is smooth at the scale of the step h.
        resampler = resampling.optimal_transport(
            threshold=1e-12, max_iterations=20000, implicit_gradient=implicit_gradient
        )

        def expectation(log_weights, particles):
            new_particles, new_log_weights = resampler(None, log_weights, particles)
            values = jnp.sum(jnp.sin(new_particles) + 0.1 * new_particles**2, axis=1)
            return jnp.sum(jnp.exp(new_log_weights) * values)

        value_fn = jax.jit(expectation)
        grad_log_weights, grad_particles = jax.jit(jax.grad(expectation, argnums=(0, 1)))(
            log_weights, particles
        )
        assert bool(jax.jit(resampler.solve)(None, log_weights, particles)[2].converged)
        # Central differences: truncation h^2/6 |f'''| ~ 1e-10 and rounding plus Sinkhorn
        # residue (1e-12) over h ~ 1e-7 for h = 1e-5; rtol = 1e-6 leaves a wide margin while
        # a wrong or missing term (e.g. a distorted implicit linear solve) is O(1).
        h = 1e-5
        for direction_index in range(3):
            direction_rng = np.random.default_rng(20 + direction_index)
            dl = jnp.asarray(direction_rng.standard_normal(n))
            dx = jnp.asarray(direction_rng.standard_normal((n, d)))
            finite_difference = (
                value_fn(log_weights + h * dl, particles + h * dx)
                - value_fn(log_weights - h * dl, particles - h * dx)
            ) / (2.0 * h)
            directional = jnp.sum(grad_log_weights * dl) + jnp.sum(grad_particles * dx)
            np.testing.assert_allclose(directional, finite_difference, rtol=1e-6, atol=1e-9)


def _ancestors(new_particles, particles):
    """Indices of the input rows that the output rows copy (input rows are distinct)."""
    distance = np.abs(np.asarray(new_particles)[:, None, :] - np.asarray(particles)[None])
    return np.argmin(distance.sum(axis=-1), axis=1)


def test_stop_gradient_log_weights_uniform_in_value_with_score_gradient(
    value_and_grad, smooth_function
):
    n = 32
    log_weights, particles = _cloud(n, 1, seed=3)
    resampler = resampling.stop_gradient()
    key = jax.random.key(3)
    (value, (new_particles, new_log_weights)), (grad_log_weights, grad_particles) = value_and_grad(
        resampler
    )(log_weights, particles, key)
    eps = float(jnp.finfo(new_log_weights.dtype).eps)
    np.testing.assert_allclose(new_log_weights, -math.log(n), rtol=10 * eps)

    # Score-function form: E = (1/N) sum_j f(X_{I_j}) exp(l_{I_j} - sg(l_{I_j})), so
    # dE/dl = (1/N) sum_j f(X_{I_j}) d log w_{I_j}/dl with d log w_i / dl_k = 1[i=k] - w_k,
    # and the pathwise part dE/dX_i = (number of copies of i) f'(X_i) / N.
    ancestors = _ancestors(new_particles, particles)
    values = np.asarray(smooth_function(particles), np.float64)
    weights = softmax(np.asarray(log_weights, np.float64))
    counts = np.bincount(ancestors, minlength=n)
    expected_log_weights = (counts * values - weights * values[ancestors].sum()) / n
    derivative = np.cos(np.asarray(particles, np.float64)) + 0.2 * np.asarray(particles)
    expected_particles = counts[:, None] * derivative / n
    # Both sides are the same N-term sums in a different order: N ulps of the largest term.
    tolerance = n * eps * np.abs(values).max()
    assert np.any(counts != 1)  # the cloud really was resampled
    assert np.any(np.asarray(grad_log_weights) != 0)
    np.testing.assert_allclose(value, values[ancestors].mean(), rtol=n * eps)
    np.testing.assert_allclose(grad_log_weights, expected_log_weights, atol=tolerance)
    np.testing.assert_allclose(grad_particles, expected_particles, atol=tolerance)


@functools.cache
def _gradient_over_keys(resampler):
    def expectation(log_weights, particles, key):
        new_particles, new_log_weights = resampler(key, log_weights, particles)
        flat = new_particles.reshape(new_particles.shape[0], -1)
        values = jnp.sum(jnp.sin(flat) + 0.1 * flat**2, axis=1)
        return jnp.sum(jnp.exp(new_log_weights) * values)

    gradient = jax.grad(expectation)
    return jax.jit(jax.vmap(gradient, in_axes=(None, None, 0)))


def test_stop_gradient_is_unbiased_where_naive_autodiff_is_not():
    n, repeats = 16, 512
    log_weights, particles = _cloud(n, 1, seed=4)
    keys = jax.random.split(jax.random.key(4), repeats)
    values = (
        np.sin(np.asarray(particles[:, 0], np.float64))
        + 0.1 * np.asarray(particles[:, 0], np.float64) ** 2
    )
    weights = softmax(np.asarray(log_weights, np.float64))
    # d/dl_k of sum_i w_i f(X_i) with w = softmax(l).
    exact = weights * (values - weights @ values)

    for base in (resampling.systematic(), resampling.multinomial()):
        samples = np.asarray(
            _gradient_over_keys(resampling.stop_gradient(base))(log_weights, particles, keys),
            np.float64,
        )
        standard_error = samples.std(axis=0, ddof=1) / math.sqrt(repeats)
        # Five standard errors per component: P(any of 16 exceeds) ~ 1e-5 for an unbiased
        # estimator, while a biased one (or a wrong sign or factor) fails.
        np.testing.assert_array_less(np.abs(samples.mean(axis=0) - exact), 5 * standard_error)

    # The canary: without stop-gradient the index draw is not differentiable and autodiff
    # returns exactly zero for the log-weights, far from the exact gradient.
    naive = np.asarray(
        _gradient_over_keys(resampling.multinomial())(log_weights, particles, keys[:4])
    )
    assert np.all(naive == 0)
    assert np.max(np.abs(exact)) > 10 * np.max(standard_error)


def test_optimal_transport_reports_non_convergence():
    log_weights, particles = _cloud(64, 2, seed=5)
    log_weights = 3.0 * log_weights  # uneven weights: Sinkhorn needs many iterations
    threshold = 1e-6
    stopped = resampling.optimal_transport(threshold=threshold, max_iterations=1)
    new_particles, new_log_weights, info = jax.jit(stopped.solve)(None, log_weights, particles)
    assert not bool(info.converged)
    assert float(info.error) > threshold
    # Still a convex combination of the input (columns renormalised), hence finite.
    assert np.all(np.isfinite(new_particles)) and np.all(np.isfinite(new_log_weights))
    # Up to rounding of the N-term convex combination.
    slack = 64 * float(jnp.finfo(new_particles.dtype).eps) * float(jnp.abs(particles).max())
    assert np.all(new_particles <= particles.max(axis=0) + slack)
    assert np.all(new_particles >= particles.min(axis=0) - slack)

    converged = resampling.optimal_transport(threshold=1e-3)
    _, _, info = jax.jit(converged.solve)(None, log_weights, particles)
    assert bool(info.converged)
    assert float(info.error) <= 1e-3
    assert 0 < int(info.num_iterations) <= converged.max_iterations

    # Diagnostics are batched like everything else under vmap.
    batched = jax.jit(jax.vmap(stopped.solve, in_axes=(None, 0, 0)))(
        None, jnp.stack([log_weights, log_weights]), jnp.stack([particles, particles])
    )
    assert batched[2].converged.shape == (2,) and not np.any(batched[2].converged)
