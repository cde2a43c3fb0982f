"""Fixtures shared by the resampler tests: every resampler, and one cached jitted
value-and-gradient function per resampler so that files using the same shapes share compiles."""

import functools

import jax
import jax.numpy as jnp
import pytest

from numpyro_diffres import resampling

RESAMPLERS = {
    "diffusion": resampling.diffusion(),
    "diffusion_euler_full": resampling.diffusion(integrator="euler", covariance="full"),
    "diffusion_sde": resampling.diffusion(ode=False),
    "multinomial": resampling.multinomial(),
    "systematic": resampling.systematic(),
    "stratified": resampling.stratified(),
    "stop_gradient": resampling.stop_gradient(),
    "soft": resampling.soft(0.5),
    "gumbel_softmax": resampling.gumbel_softmax(0.3),
    "optimal_transport": resampling.optimal_transport(0.5),
}


@pytest.fixture(params=list(RESAMPLERS.values()), ids=list(RESAMPLERS))
def resampler(request):
    """Every resampler of the library, in a configuration that exercises its own code path."""
    return request.param


def _smooth(particles):
    # Smooth and not linear, so that neither the mean nor the variance alone determines it.
    flat = particles.reshape(particles.shape[0], -1)
    return jnp.sum(jnp.sin(flat) + 0.1 * flat**2, axis=1)


@functools.cache
def _value_and_grad(resampler):
    def expectation(log_weights, particles, key):
        new_particles, new_log_weights = resampler(key, log_weights, particles)
        value = jnp.sum(jnp.exp(new_log_weights) * _smooth(new_particles))
        return value, (new_particles, new_log_weights)

    return jax.jit(jax.value_and_grad(expectation, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="session")
def value_and_grad():
    """`value_and_grad(resampler)(log_weights, particles, key)`.

    Returns `((E, (particles, log_weights)), (dE/dlog_weights, dE/dparticles))`, where
    `E = sum_j exp(new_log_weights_j) f(new_particles_j)` for a fixed smooth `f`; jitted once
    per resampler (and shape) for the whole session.
    """
    return _value_and_grad


@pytest.fixture(scope="session")
def smooth_function():
    """The smooth per-particle function `f` used by `value_and_grad`, shape `(N, ...) -> (N,)`."""
    return _smooth
