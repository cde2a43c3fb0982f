"""Gumbel-softmax resampling (the concrete relaxation of multinomial resampling).

Each output particle is $\\mathrm{softmax}((l + g_i)/\\tau)^\\top X$ with fresh Gumbel noise
$g_i \\in \\mathbb{R}^N$: a convex combination of input particles that tends to a multinomial
draw as $\\tau \\to 0$. Differentiable, but biased for every $\\tau > 0$ (it shrinks the cloud).
"""

import dataclasses

import jax

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_positive
from numpyro_diffres.resampling.base import (
    MovesParticles,
    prepare,
    standard_draw,
    uniform_log_weights,
)

__all__ = ["GumbelSoftmax", "gumbel_softmax"]


@dataclasses.dataclass(frozen=True)
class GumbelSoftmax(MovesParticles):
    """Gumbel-softmax resampling with temperature `tau`."""

    tau: float

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; returns `(particles, log_weights)` with uniform log-weights."""
        flat, normalized, event_shape = prepare(log_weights, particles)
        n = flat.shape[0]
        gumbel = standard_draw(jax.random.gumbel, key, (n, n), flat.dtype)
        mixing = jax.nn.softmax((normalized[None, :] + gumbel) / self.tau, axis=1)
        return (mixing @ flat).reshape(n, *event_shape), uniform_log_weights(n, flat.dtype)


def gumbel_softmax(tau: float = 0.3) -> GumbelSoftmax:
    """Gumbel-softmax resampling.

    Args:
        tau: temperature, positive. Small values approach multinomial resampling (and its
            high-variance gradients); large values average the cloud towards its mean.

    Raises:
        ValueError: `tau` not positive.
    """
    check_positive("tau", tau)
    return GumbelSoftmax(float(tau))
