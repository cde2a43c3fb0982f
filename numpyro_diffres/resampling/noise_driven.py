"""Resamplers that take standard-normal noise in place of a PRNG key.

Pseudo-marginal samplers hold every random number of a particle-filter run as standard normals
$u$ in the chain's state. A resampler that runs on them says so with the trait
`takes_noise = True`: it is called as `resampler(noise, log_weights, particles)` and gives the
shape of the noise one call takes, `noise_shape(num_particles, event_shape)`, so the filter can
size a run's noise. A key-driven resampler may have such a form, which its `driven_by_noise()`
returns (None when it has none):

* `systematic()` -> `sorted_systematic()`: one normal per call, unbiased (PMMH stays exact),
  but piecewise constant in $u$ and the parameters;
* `diffusion(...)` -> the same map with its start (and SDE step noises) given: smooth in $u$
  and the parameters (pseudo-marginal HMC), but the estimate is not unbiased.
"""

from typing import Protocol

from numpyro_diffres._typing import Array
from numpyro_diffres.resampling.base import Resampler
from numpyro_diffres.resampling.sorted import sorted_systematic

__all__ = ["NoiseResampler", "noise_driven"]


class NoiseResampler(Protocol):
    """A resampler `(noise, log_weights, particles) -> (particles, log_weights)`.

    `noise` holds standard normals of shape `noise_shape(N, event_shape)`; the traits
    `moves_particles` and `has_ancestors` are those of `Resampler`.
    """

    takes_noise: bool
    moves_particles: bool
    has_ancestors: bool

    def noise_shape(self, num_particles: int, event_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one call's standard normals."""
        ...

    def __call__(self, noise: Array, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample `particles` according to `log_weights`, driven by `noise`."""
        ...


def noise_driven(resampler: Resampler | NoiseResampler | None) -> NoiseResampler:
    """The form of `resampler` that takes standard normals in place of a key.

    Args:
        resampler: None (sorted systematic resampling, unbiased: what the pseudo-marginal
            Metropolis-Hastings kernels need), a resampler that already takes noise, or one
            whose `driven_by_noise()` gives its noise-driven form (`systematic()`,
            `diffusion(...)`).

    Returns:
        A `NoiseResampler`.

    Raises:
        ValueError: a resampler without a noise-driven form.
    """
    if resampler is None:
        return sorted_systematic()
    if getattr(resampler, "takes_noise", False):
        return resampler
    convert = getattr(resampler, "driven_by_noise", None)
    driven = None if convert is None else convert()
    if driven is None:
        raise ValueError(
            f"The particle filter on explicit noise (noise='sampled', noise.noise_filter) needs "
            f"a resampler driven by standard normals; {resampler!r} has no such form. Pass "
            "resampler=None or ndr.resampling.systematic() (sorted systematic resampling: an "
            "unbiased estimate, for ndr.infer.PMMH / CorrelatedPMMH), or "
            "ndr.resampling.diffusion(...) (smooth in the noise and the parameters, for NUTS "
            "on both: pseudo-marginal HMC; not unbiased)."
        )
    return driven
