"""Systematic resampling over sorted particles, driven by standard-normal noise.

The resampler of the correlated pseudo-marginal method (Deligiannidis, Doucet and Pitt 2018):
the particles are sorted along one axis (the state in one dimension; the first coordinate of
the flattened state otherwise, where a Hilbert-curve order would keep more correlation) and
resampled systematically with the uniform $\\Phi(u)$ of one standard normal $u$. Systematic
resampling over any fixed order is unbiased; the sort makes the draw change little when the
particles or $u$ change a little, so estimates at nearby $(\theta, u)$ stay correlated.

It takes standard-normal noise where other resamplers take a PRNG key: the filter hands it the
step's resampling noise when it runs on explicit noise (`filtering.run_filter` with a
`FilterNoise`).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from numpyro_diffres._typing import Array
from numpyro_diffres.resampling.base import PicksAncestors, uniform_log_weights

__all__ = ["SortedSystematic", "sorted_systematic"]


def sorted_ancestors(uniform: Array, log_weights: Array, particles: Array) -> Array:
    """Ancestors by systematic resampling over particles sorted along one axis.

    Args:
        uniform: one uniform in $[0, 1)$.
        log_weights: normalised log-weights, `(N,)`.
        particles: `(N, *state)`.

    Returns:
        Ancestor indices, `(N,)`.
    """
    num_particles = log_weights.shape[0]
    flat = particles.reshape(num_particles, -1)
    order = jnp.argsort(flat[:, 0])
    cumulative = jnp.cumsum(jnp.exp(jax.lax.stop_gradient(log_weights))[order])
    positions = (uniform + jnp.arange(num_particles, dtype=cumulative.dtype)) / num_particles
    # Positions past the rounded total (just below 1) belong to the last particle.
    picks = jnp.minimum(jnp.searchsorted(cumulative, positions), num_particles - 1)
    return order[picks]


@dataclasses.dataclass(frozen=True)
class SortedSystematic(PicksAncestors):
    """Systematic resampling over sorted particles; `noise` is one standard normal."""

    takes_noise: ClassVar[bool] = True

    def noise_shape(self, num_particles: int, event_shape: tuple[int, ...]) -> tuple[int, ...]:
        """One standard normal per call, whatever the particles: `()`."""
        return ()

    def resample_with_ancestors(
        self, noise: Array, log_weights: Array, particles: Array
    ) -> tuple[Array, Array, Array]:
        """Resample; returns `(particles, uniform log-weights, ancestors)`."""
        ancestors = sorted_ancestors(ndtr(noise), log_weights, particles)
        uniform = uniform_log_weights(log_weights.shape[0], log_weights.dtype)
        return particles[ancestors], uniform, ancestors

    def __call__(self, noise: Array, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; returns `(particles, log_weights)` with uniform log-weights."""
        return self.resample_with_ancestors(noise, log_weights, particles)[:2]


def sorted_systematic() -> SortedSystematic:
    """Systematic resampling over sorted particles, driven by standard-normal noise."""
    return SortedSystematic()
