"""`jit`, `vmap` and `grad` work for every resampler, with any event shape."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_diffres import resampling

# Index draws are piecewise constant in the log-weights: autodiff gives them no gradient.
NOT_DIFFERENTIABLE_IN_WEIGHTS = (resampling.IndexResampler,)


def _cloud(n, event_shape, seed):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal(n)),
        jnp.asarray(rng.standard_normal((n, *event_shape))),
    )


@functools.cache
def _single(resampler):
    return jax.jit(resampler)


@functools.cache
def _over_keys(resampler):
    return jax.jit(jax.vmap(resampler, in_axes=(0, None, None)))


def test_vmap_over_keys_matches_jit_per_key(resampler):
    batch, n, event_shape = 3, 16, (2, 2)
    keys = jax.random.split(jax.random.key(0), batch)
    log_weights, particles = _cloud(n, event_shape, seed=0)

    batched_particles, batched_log_weights = _over_keys(resampler)(keys, log_weights, particles)
    assert batched_particles.shape == (batch, n, *event_shape)
    assert batched_log_weights.shape == (batch, n)
    # Batching may reorder floating-point sums; a few hundred ulps covers that after the
    # K-step diffusion map or the Sinkhorn iterations, while anything structural is O(1).
    tolerance = 256 * float(jnp.finfo(batched_particles.dtype).eps)
    for b in range(batch):
        single_particles, single_log_weights = _single(resampler)(keys[b], log_weights, particles)
        assert single_particles.shape == (n, *event_shape)
        assert np.all(np.isfinite(single_particles))
        np.testing.assert_allclose(
            batched_particles[b], single_particles, rtol=tolerance, atol=tolerance
        )
        np.testing.assert_allclose(
            batched_log_weights[b], single_log_weights, rtol=tolerance, atol=tolerance
        )
        # Output weights are normalised, and uniform except for soft resampling, which
        # returns importance-corrected weights w/q.
        np.testing.assert_allclose(jax.nn.logsumexp(single_log_weights), 0.0, atol=tolerance)
        if not isinstance(resampler, resampling.Soft):
            np.testing.assert_allclose(single_log_weights, -math.log(n), rtol=tolerance)
    # Different keys give different draws (OT is deterministic given the cloud).
    if not isinstance(resampler, resampling.OptimalTransport):
        assert not np.allclose(batched_particles[0], batched_particles[1])


def test_grad_is_finite(resampler, value_and_grad):
    n = 32
    log_weights, particles = _cloud(n, (2,), seed=2)
    (value, _), (grad_log_weights, grad_particles) = value_and_grad(resampler)(
        log_weights, particles, jax.random.key(2)
    )
    assert np.isfinite(value)
    assert grad_log_weights.shape == (n,) and grad_particles.shape == (n, 2)
    assert np.all(np.isfinite(grad_log_weights)) and np.all(np.isfinite(grad_particles))
    # Every resampler passes a pathwise gradient to the particles.
    assert np.any(grad_particles != 0)
    if isinstance(resampler, NOT_DIFFERENTIABLE_IN_WEIGHTS):
        assert np.all(grad_log_weights == 0)
    else:
        assert np.any(grad_log_weights != 0)


@pytest.mark.parametrize(
    "resampler_factory",
    [
        resampling.multinomial,
        resampling.systematic,
        resampling.stratified,
        resampling.stop_gradient,
    ],
)
def test_index_resamplers_accept_discrete_states(resampler_factory):
    resampler = resampler_factory()
    states = jnp.arange(8)
    log_weights = jnp.where(jnp.isin(states, jnp.asarray([3, 7])), 0.0, -jnp.inf)
    new_states, _ = _single(resampler)(jax.random.key(4), log_weights, states)
    assert new_states.dtype == states.dtype
    assert set(np.asarray(new_states).tolist()) <= {3, 7}
