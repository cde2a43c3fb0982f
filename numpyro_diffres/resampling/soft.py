"""Soft resampling (Karkus, Hsu & Lee, "Particle filter networks", 2018).

Ancestors are drawn from the mixture $q = \\alpha w + (1 - \\alpha)/N$ and the new weights are
$w_I / q_I$, normalised. The gradient flows through the weights only (and pathwise through the
copied particles) and is biased; at $\\alpha = 1$ it is plain index resampling, with no
gradient through the weights at all.
"""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from numpyro_diffres._log_density import log_normalize
from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_fraction, check_kind
from numpyro_diffres.resampling.base import PicksAncestors, prepare
from numpyro_diffres.resampling.index import IndexResampler, multinomial

__all__ = ["Soft", "soft"]


@dataclasses.dataclass(frozen=True)
class Soft(PicksAncestors):
    """Soft resampling with mixing weight `alpha`."""

    # Its output log-weights are importance weights normalised over the drawn particles: a
    # ratio, so a likelihood estimate built on them is not unbiased (PMMH refuses it).
    reweights: ClassVar[bool] = True

    alpha: float
    base: IndexResampler

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; returns `(particles, log_weights)` with importance-corrected weights."""
        flat, normalized, event_shape = prepare(log_weights, particles, require_float=False)
        n = flat.shape[0]
        if self.alpha == 1.0:
            log_q = normalized
        else:
            log_q = jnp.logaddexp(
                jnp.log(self.alpha) + normalized, jnp.log1p(-self.alpha) - jnp.log(n)
            )
        ancestors = self.base.indices(key, log_q, n)
        new_log_weights, _ = log_normalize(normalized[ancestors] - log_q[ancestors])
        return flat[ancestors].reshape(n, *event_shape), new_log_weights


def soft(alpha: float = 0.5, *, base: IndexResampler | None = None) -> Soft:
    """Soft resampling.

    Args:
        alpha: weight of the target in the proposal mixture, in $(0, 1]$.
        base: index resampler drawing from the mixture; default `multinomial()`.

    Raises:
        TypeError: `alpha` is not a number, or `base` is not an index resampler.
        ValueError: `alpha` outside $(0, 1]$.
    """
    alpha = check_fraction("alpha", alpha, include_zero=False)
    base = multinomial() if base is None else base
    check_kind(base, IndexResampler, "soft(base=...) needs an index resampler")
    return Soft(alpha, base)
