"""Log-weight arithmetic shared by the resamplers and the filter.

Every function here works in log space and is safe for the degenerate cases a filter meets
under extreme parameters: log-weights that are all $-\\infty$ give a log normaliser of
$-\\infty$, uniform normalised weights and zero (never NaN) gradients.
"""

import jax.numpy as jnp
from jax.scipy.special import logsumexp

from numpyro_diffres._typing import Array

__all__ = ["effective_sample_size", "log_normalize", "weighted_moments"]


def log_normalize(log_weights: Array) -> tuple[Array, Array]:
    """Normalise log-weights along the last axis.

    NaN and $+\\infty$ log-weights are treated as invalid ($-\\infty$). When every log-weight is
    $-\\infty$ the weights carry no information: the normalised weights are uniform and the
    normaliser is $-\\infty$.

    Args:
        log_weights: unnormalised log-weights, shape `(N,)`.

    Returns:
        `(normalized, log_normalizer)`: log-weights with $\\sum_i e^{l_i} = 1$, shape `(N,)`,
        and $\\log \\sum_i e^{l_i}$, a scalar.
    """
    log_weights = jnp.where(
        jnp.isnan(log_weights) | (log_weights == jnp.inf), -jnp.inf, log_weights
    )
    alive = jnp.any(log_weights > -jnp.inf)
    # Double `where`: the dead branch must not produce NaN cotangents.
    safe = jnp.where(alive, log_weights, jnp.zeros_like(log_weights))
    log_normalizer = logsumexp(safe)
    n = log_weights.shape[-1]
    normalized = jnp.where(alive, safe - log_normalizer, -jnp.log(n) * jnp.ones_like(safe))
    return normalized, jnp.where(alive, log_normalizer, -jnp.inf)


def effective_sample_size(log_weights: Array) -> Array:
    """Effective sample size $1 / \\sum_i w_i^2$ of normalised log-weights, shape `(N,)`."""
    return jnp.exp(-logsumexp(2.0 * log_weights))


def weighted_moments(log_weights: Array, values: Array) -> tuple[Array, Array]:
    """Weighted mean and per-coordinate variance.

    Args:
        log_weights: normalised log-weights, shape `(N,)`.
        values: shape `(N, *event_shape)`.

    Returns:
        `(mean, variance)`, each of shape `event_shape`.
    """
    weights = jnp.exp(log_weights)
    mean = jnp.tensordot(weights, values, axes=1)
    variance = jnp.tensordot(weights, (values - mean) ** 2, axes=1)
    return mean, variance
