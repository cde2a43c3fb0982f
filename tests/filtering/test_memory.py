"""Reverse-mode memory of the filter grows with N, not with T x K x N^2 (XLA's compiled plan).

The compiled executable's temporary-buffer size is read from `memory_analysis()` without
running it, so the check is cheap and deterministic.
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import numpyro_diffres as ndr


def _temporary_bytes(num_particles, num_steps):
    def model(phi):
        return ndr.StateSpaceModel(
            initial=dist.Normal(jnp.zeros(4), 1.0).to_event(1),
            transition=lambda x, t: dist.Normal(phi * x, 1.0).to_event(1),
            emission=lambda x, t: dist.Normal(x, 0.5).to_event(1),
        )

    observations = jnp.zeros((num_steps, 4))

    def log_likelihood(phi):
        return ndr.particle_filter(
            jax.random.PRNGKey(0), model(phi), observations, num_particles=num_particles
        ).log_likelihood

    compiled = jax.jit(jax.value_and_grad(log_likelihood)).lower(0.5).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes


def test_gradient_memory_is_bounded_and_flat_in_time():
    with jax.enable_x64(True):
        short = _temporary_bytes(4096, 5)
        long = _temporary_bytes(4096, 20)
    # Storing every attention matrix would take T * K * N^2 * 8 bytes (K = 8): 5 GiB at T = 5.
    naive_short = 5 * 8 * 4096**2 * 8
    assert short < naive_short / 20, (short, naive_short)
    # Four times the time steps may add O(T N d) carried states, not O(N^2) matrices.
    assert long - short < 4096 * 4096 * 8, (short, long)
