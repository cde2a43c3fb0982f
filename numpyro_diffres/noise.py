"""The particle filter driven by explicit standard-normal noise, for pseudo-marginal samplers.

For pseudo-marginal MCMC the filter's randomness $u$ is part of the chain's state: every random
draw of one filter run is a deterministic function of one array of standard normals (a
`FilterNoise`), run through the same core as every other filter (`filtering.run_filter`):

* each particle's move $x_t^i = F(u_t^i)$ (`noise_draws.draw_from_noise`);
* each step's resampling, by a resampler that takes standard normals in place of a key
  (`resampling.noise_driven`), sized by its `noise_shape`.

Two resamplers, two samplers on the extended target
$p(\\theta)\\,N(u; 0, I)\\,\\hat p(y \\mid \\theta, u)$:

* sorted systematic (the default): systematic resampling with the uniform $\\Phi(u_t)$ over the
  particles sorted along one axis (`resampling.sorted_systematic`). It keeps the estimate
  unbiased, so pseudo-marginal MCMC on it stays exact; sorting makes the estimates at nearby
  $(\\theta, u)$ nearby, which is what the correlated pseudo-marginal method (Deligiannidis,
  Doucet and Pitt 2018) needs: moving $u$ by Crank-Nicolson then gives strongly correlated
  successive estimates. The estimate is still piecewise constant in $(\\theta, u)$.
* diffusion (`resampling.diffusion(...)`): its start (and SDE step noises) come from $u$, so
  the estimate is a smooth function of $(\\theta, u)$ and HMC/NUTS can move both:
  pseudo-marginal HMC (Alenlöv, Doucet and Lindsten, JMLR 2021). Diffusion resampling is
  consistent, not unbiased, so that chain's $\\theta$-marginal is
  $\\propto p(\\theta)\\,E_u[\\hat p(y \\mid \\theta, u)]$, near the posterior for large $N$ only.
"""

import math

import jax.numpy as jnp

from numpyro_diffres._typing import Array
from numpyro_diffres.filter_types import FilterNoise
from numpyro_diffres.filtering import FilterResult, run_filter
from numpyro_diffres.resampling import Resampler
from numpyro_diffres.resampling.noise_driven import NoiseResampler, noise_driven
from numpyro_diffres.ssm import StateSpaceModel
from numpyro_diffres.ssm_kernel import state_space_kernel

__all__ = ["FilterNoise", "noise_filter", "noise_shape", "unflatten_noise"]


def noise_shape(
    num_steps: int,
    num_particles: int,
    state_shape: tuple[int, ...],
    batch_shape=(),
    *,
    resampler: Resampler | NoiseResampler | None = None,
) -> FilterNoise:
    """The shapes of a `FilterNoise` (a `FilterNoise` of shape tuples).

    The resampling noise of each later step is `(*B, *noise_shape)` with the resampler's
    `noise_shape(N, state_shape)`: `()` for sorted systematic (the default, `resampler=None`),
    `(N, d)` for diffusion's ODE and `(K + 1, N, d)` for its SDE ($d$ the state size).

    Raises:
        ValueError: a resampler with no noise-driven form (`resampling.noise_driven`).
    """
    particle = (num_particles, *batch_shape, *state_shape)
    later = max(num_steps - 1, 0)
    per_step = noise_driven(resampler).noise_shape(num_particles, tuple(state_shape))
    return FilterNoise(particle, (later, *particle), (later, *batch_shape, *per_step))


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
    resampler: Resampler | NoiseResampler | None = None,
    batch_shape: tuple[int, ...] = (),
) -> FilterResult:
    """Run the bootstrap (or guided) particle filter on explicit noise.

    Every step resamples, driven by the step's resampling noise; the number of particles is
    `noise.initial`'s first axis.

    Args:
        noise: a `FilterNoise` of standard normals (shapes from `noise_shape` with the same
            `resampler`).
        model: the state-space model (distributions that `noise_draws.draw_from_noise`
            supports).
        observations: `(T, *observation_shape)` (for many series `(*B, T, ...)`); NaN rows
            are missing.
        resampler: None (default) for sorted systematic resampling, whose estimate is
            unbiased (for the pseudo-marginal Metropolis-Hastings kernels), or any resampler
            with a noise-driven form (`resampling.noise_driven`): `systematic()` is the
            default again, `diffusion(...)` makes the estimate smooth in the noise (for
            pseudo-marginal HMC) and not unbiased.
        batch_shape: the series shape $B$; see `particle_filter`.

    Returns:
        A `FilterResult` (series-first for many series).

    Raises:
        ValueError: a resampler with no noise-driven form, or a `noise` field of another
            shape than `noise_shape` gives for these observations.
    """
    resampler = noise_driven(resampler)
    observations = jnp.asarray(observations)
    num_particles = noise.initial.shape[0]
    state_shape = noise.initial.shape[1 + len(batch_shape) :]
    num_steps = observations.shape[len(batch_shape)]
    expected = noise_shape(
        num_steps, num_particles, state_shape, tuple(batch_shape), resampler=resampler
    )
    for field, array, shape in zip(FilterNoise._fields, noise, expected, strict=True):
        if jnp.shape(array) != shape:
            raise ValueError(
                f"noise.{field} must have shape {shape} for {num_steps} steps of "
                f"{num_particles} particles with {resampler!r}; got {jnp.shape(array)}."
            )
    kernel = state_space_kernel(model, batch_shape=batch_shape, noise_driven=True)
    return run_filter(
        noise,
        kernel,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        batch_shape=batch_shape,
    ).result
