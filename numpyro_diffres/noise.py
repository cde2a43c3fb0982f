"""The particle filter driven by explicit standard-normal noise, for pseudo-marginal samplers.

For pseudo-marginal MCMC the filter's randomness $u$ is part of the chain's state: every random
draw of one filter run is a deterministic function of one array of standard normals (a
`FilterNoise`), run through the same core as every other filter (`filtering.run_filter`):

* each particle's move $x_t^i = F(u_t^i)$ (`noise_draws.draw_from_noise`);
* each step's resampling: systematic resampling with the uniform $\\Phi(u_t)$ over the particles
  sorted along one axis (`resampling.sorted_systematic`).

Systematic resampling keeps the estimate unbiased, so pseudo-marginal MCMC on it stays exact;
sorting makes the estimates at nearby $(\\theta, u)$ nearby, which is what the correlated
pseudo-marginal method (Deligiannidis, Doucet and Pitt 2018) needs: moving $u$ by
Crank-Nicolson then gives strongly correlated successive estimates.
"""

import math

import jax.numpy as jnp

from numpyro_diffres._typing import Array
from numpyro_diffres.filter_types import FilterNoise
from numpyro_diffres.filtering import FilterResult, run_filter
from numpyro_diffres.resampling.sorted import sorted_systematic
from numpyro_diffres.ssm import StateSpaceModel
from numpyro_diffres.ssm_kernel import state_space_kernel

__all__ = ["FilterNoise", "noise_filter", "noise_shape", "unflatten_noise"]


def noise_shape(
    num_steps: int, num_particles: int, state_shape: tuple[int, ...], batch_shape=()
) -> FilterNoise:
    """The shapes of a `FilterNoise` (a `FilterNoise` of shape tuples)."""
    particle = (num_particles, *batch_shape, *state_shape)
    later = max(num_steps - 1, 0)
    return FilterNoise(particle, (later, *particle), (later, *batch_shape))


def unflatten_noise(flat: Array, shapes: FilterNoise) -> FilterNoise:
    """Split one flat vector of standard normals into a `FilterNoise` of `shapes`."""
    sizes = [math.prod(shape) for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return FilterNoise(
        *(
            flat[start:stop].reshape(shape)
            for start, stop, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)
        )
    )


def noise_filter(
    noise: FilterNoise,
    model: StateSpaceModel,
    observations: Array,
    *,
    batch_shape: tuple[int, ...] = (),
) -> FilterResult:
    """Run the bootstrap (or guided) particle filter on explicit noise.

    Every step resamples (sorted systematic from the step's resampling noise), so the
    likelihood estimate is unbiased; the number of particles is `noise.initial`'s first axis.

    Args:
        noise: a `FilterNoise` of standard normals (shapes from `noise_shape`).
        model: the state-space model (distributions that `noise_draws.draw_from_noise`
            supports).
        observations: `(T, *observation_shape)` (for many series `(*B, T, ...)`); NaN rows
            are missing.
        batch_shape: the series shape $B$; see `particle_filter`.

    Returns:
        A `FilterResult` (series-first for many series).
    """
    kernel = state_space_kernel(model, batch_shape=batch_shape, noise_driven=True)
    return run_filter(
        noise,
        kernel,
        jnp.asarray(observations),
        num_particles=noise.initial.shape[0],
        resampler=sorted_systematic(),
        batch_shape=batch_shape,
    ).result
