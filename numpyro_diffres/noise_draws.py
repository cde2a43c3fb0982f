r"""Draws of NumPyro distributions from explicit standard-normal noise.

The pseudo-marginal samplers hold the particle filter's randomness as standard normals $u$; a
transition's draw is then a deterministic, smooth function of its noise: $\mu + \sigma u$ for
a normal, $\mu + L u$ for a multivariate normal, the same through the transforms of a
transformed distribution (e.g. a log-normal), $F^{-1}(\Phi(u))$ for another univariate family
with an inverse CDF.
"""

import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import ndtr
from numpyro.distributions import Distribution

from numpyro_diffres._typing import Array

__all__ = ["SUPPORTED", "draw_from_noise"]

SUPPORTED = (
    "Normal, MultivariateNormal, TransformedDistribution of those (e.g. LogNormal), "
    "Independent/expanded versions of them, Delta, and univariate families with an inverse CDF "
    "(e.g. Uniform, Cauchy, Laplace, Gumbel, Exponential)"
)


def draw_from_noise(distribution: Distribution, noise: Array) -> Array:
    """The draw of `distribution` that standard-normal `noise` (its `shape()`) stands for.

    Args:
        distribution: a NumPyro distribution of a supported family.
        noise: standard normals of shape `distribution.shape()`.

    Returns:
        The draw, shape `distribution.shape()`.

    Raises:
        TypeError: a family that cannot be driven by standard-normal noise.
    """
    if isinstance(distribution, dist.Normal):
        return distribution.loc + distribution.scale * noise
    if isinstance(distribution, dist.MultivariateNormal):
        return distribution.loc + jnp.squeeze(distribution.scale_tril @ noise[..., None], -1)
    if isinstance(distribution, dist.Delta):
        return jnp.broadcast_to(distribution.v, noise.shape)
    if isinstance(distribution, dist.Independent):
        return draw_from_noise(distribution.base_dist, noise)
    if isinstance(distribution, dist.ExpandedDistribution):
        base = distribution.base_dist
        return jnp.broadcast_to(draw_from_noise(base, noise), noise.shape)
    if isinstance(distribution, dist.TransformedDistribution):
        value = draw_from_noise(distribution.base_dist, noise)
        for transform in distribution.transforms:
            value = transform(value)
        return value
    if not distribution.event_shape:
        try:
            return distribution.icdf(ndtr(noise))
        except NotImplementedError:
            pass
    raise TypeError(
        f"The particle filter's explicit noise cannot drive a {type(distribution).__name__} "
        f"draw. Supported: {SUPPORTED}. Write the transition as one of these (e.g. a "
        "location-scale family), or use noise=None (a PRNG key per proposal)."
    )
