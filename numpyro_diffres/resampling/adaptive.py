"""ESS-triggered resampling as a resampler transform.

`adaptive(resampler, threshold)` resamples only when the effective sample size falls below
`threshold * N`, and otherwise passes the weighted cloud through. Under a fixed key the switch
between the two branches is itself a jump in the parameters, which is why the filters resample
at every step by default.
"""

import dataclasses

import jax

from numpyro_diffres._log_density import effective_sample_size, log_normalize
from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_callable, check_fraction
from numpyro_diffres.resampling.base import Resampler, Wrapper

__all__ = ["Adaptive", "adaptive"]


@dataclasses.dataclass(frozen=True)
class Adaptive(Wrapper):
    """Resample with `resampler` when ESS < `threshold * N`; see `adaptive`."""

    threshold: float

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample if the weights are degenerate enough, else return the input unchanged."""
        n = particles.shape[0]
        if self.threshold <= 0.0:
            return particles, log_weights
        if self.threshold >= 1.0:
            return self.resampler(key, log_weights, particles)
        normalized, _ = log_normalize(log_weights)

        def resample(key, log_weights, particles):
            new_particles, new_log_weights = self.resampler(key, log_weights, particles)
            return new_particles.astype(particles.dtype), new_log_weights.astype(log_weights.dtype)

        return jax.lax.cond(
            effective_sample_size(normalized) < self.threshold * n,
            resample,
            lambda _, log_weights, particles: (particles, log_weights),
            key,
            log_weights,
            particles,
        )


def adaptive(resampler: Resampler, threshold: float) -> Resampler:
    """Resample only when the effective sample size falls below `threshold * N`.

    Args:
        resampler: the resampler to apply when triggered.
        threshold: in $[0, 1]$; 1.0 resamples at every step (the resampler itself), 0.0 never
            resamples (the input is returned unchanged).

    Returns:
        A resampler `(key, log_weights, particles) -> (particles, log_weights)`; the
        log-weights it passes through are not renormalised.

    Raises:
        TypeError: `resampler` is not callable or `threshold` is not a number.
        ValueError: `threshold` outside $[0, 1]$.
    """
    check_callable(
        "resampler",
        resampler,
        "resampler(key, log_weights, particles)",
        "numpyro_diffres.resampling.diffusion()",
    )
    threshold = check_fraction("threshold", threshold)
    if threshold >= 1.0:
        return resampler
    return Adaptive(resampler, threshold)
