"""Safe log-densities: NaN-free model densities and log-weight arithmetic for a traced filter.

A particle filter evaluates the model's densities at every particle, under `jit`, `grad` and
NUTS, for whatever parameters the sampler proposes. NumPyro checks constraints only on
concrete values, and a `where` that discards an invalid branch still propagates that branch's
NaN derivative (`0 * nan`). The functions here turn invalid parameters, impossible values and
missing observations into weight zero (log-weight $-\\infty$) with finite gradients.

The log-weight arithmetic shared by the resamplers and the filter lives here too. It is safe
for the degenerate cases a filter meets under extreme parameters: log-weights that are all
$-\\infty$ give a log normaliser of $-\\infty$, uniform normalised weights and zero (never
NaN) gradients.
"""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.distributions import Distribution, constraints

from numpyro_diffres._typing import Array

__all__ = [
    "effective_sample_size",
    "fill_missing",
    "guard",
    "log_normalize",
    "safe_log_prob",
    "weighted_moments",
]


def safe_log_prob(distribution: Distribution, value: Array) -> Array:
    """`distribution.log_prob(value)`, $-\\infty$ (with a finite gradient) where impossible.

    Args:
        distribution: a NumPyro distribution whose `log_prob(value)` is a scalar.
        value: a point of its event shape.

    Returns:
        A scalar: the log-density, or $-\\infty$ for invalid parameters, a value outside the
        support or a non-finite density; its gradient is finite either way.
    """
    safe, valid = guard(distribution)
    # One evaluation: NaN or -inf (invalid parameters, a value outside the support, an
    # infinite observation, an overflow) is an impossible particle, not a poisoned estimate.
    # Its partial derivatives are non-finite and the `where` below would turn them into NaN
    # (0 * inf); `_finite_partials_log_prob` zeroes them, so the discarded branch contributes
    # exactly 0. The support is checked here rather than left to NumPyro's validation, which
    # the custom-derivative wrapper does not carry (it rebuilds the distribution from its
    # leaves).
    log_prob = _finite_partials_log_prob(safe, value)
    possible = valid & _in_support(safe, value) & jnp.isfinite(log_prob)
    return jnp.where(jax.lax.stop_gradient(possible), log_prob, -jnp.inf)


def _in_support(distribution: Distribution, value: Array) -> Array:
    """Whether `value` lies in the support (True where the support cannot be checked)."""
    support = distribution.support
    if constraints.is_dependent(support):
        return jnp.asarray(True)
    try:
        return jnp.all(support(value))
    except NotImplementedError:
        return jnp.asarray(True)


@jax.custom_jvp
def _finite_partials_log_prob(distribution: Distribution, value: Array) -> Array:
    """`distribution.log_prob(value)` (a scalar) whose non-finite partial derivatives are zero.

    A finite log-density can still have a NaN derivative at the edge of the parameter space,
    e.g. NumPyro's Poisson term `xlogy(k, rate)` at `k = 0` and a `rate` that underflowed to
    0 (`0 / 0`), where the limit is finite (that term's derivative is then multiplied by
    `d rate = 0` anyway). Zero is the value of such entries in the limit. A JVP rule (rather
    than a VJP) keeps forward mode, hence Hessians, available.
    """
    return distribution.log_prob(value)


@_finite_partials_log_prob.defjvp
def _finite_partials_log_prob_jvp(primals, tangents):
    log_prob, pullback = jax.vjp(lambda d, v: d.log_prob(v), *primals)
    partials = pullback(jnp.ones_like(log_prob))
    tangent = jnp.zeros_like(log_prob)
    for partial, direction in zip(
        jax.tree.leaves(partials), jax.tree.leaves(tangents), strict=True
    ):
        if jnp.issubdtype(partial.dtype, jnp.inexact):
            finite = jnp.where(jnp.isfinite(partial), partial, jnp.zeros_like(partial))
            tangent = tangent + jnp.sum(finite * direction)
    return log_prob, tangent


def guard(distribution: Distribution, replace: Array | None = None) -> tuple[Distribution, Array]:
    """Split a distribution into a safe copy and a flag saying whether its parameters are valid.

    NumPyro only checks constraints on concrete values; inside a traced filter (jit, grad,
    NUTS) an invalid parameter (a zero or negative scale proposed in warm-up) must instead give
    the particle weight zero. Evaluating `log_prob` at the invalid parameter would still put
    NaN into the gradient through the discarded branch of a `where`, so each invalid parameter
    is replaced by a feasible one (the double-`where` pattern) and the caller masks the result
    with the returned flag. Wrappers are unwrapped through `Independent`; a distribution that
    cannot be rebuilt from its parameters is only checked, not made safe. Where the optional
    boolean `replace` is true, every checked parameter is replaced by a feasible one.
    """
    if isinstance(distribution, dist.Independent):
        base, valid = guard(distribution.base_dist, replace)
        return dist.Independent(base, distribution.reinterpreted_batch_ndims), valid
    valid = jnp.asarray(True)
    safe = {}
    for name, constraint in distribution.arg_constraints.items():
        if name not in distribution.__dict__:
            continue
        value = distribution.__dict__[name]
        safe[name] = value
        if value is None or constraints.is_dependent(constraint):
            continue
        ok = jnp.all(constraint(value))
        valid = valid & ok
        keep = ok if replace is None else ok & ~replace
        safe[name] = jnp.where(keep, value, constraint.feasible_like(value))
    try:
        with numpyro.validation_enabled(False):
            rebuilt = type(distribution)(**safe)
    except (TypeError, ValueError, NotImplementedError):
        return distribution, valid
    if rebuilt.batch_shape != distribution.batch_shape:
        return distribution, valid
    return rebuilt, valid


def fill_missing(observations: Array) -> tuple[Array, Array]:
    """Missing-time mask `(T,)` and observations with missing rows filled by a valid row.

    A time step is missing when any of its entries is NaN; integer observations are never
    missing.
    """
    num_steps = observations.shape[0]
    if not jnp.issubdtype(observations.dtype, jnp.floating):
        return jnp.zeros((num_steps,), bool), observations
    flat = observations.reshape(num_steps, -1)
    missing = jnp.any(jnp.isnan(flat), axis=1)
    # A value inside the emission's support keeps log_prob (and its gradient) finite in the
    # branch that `where` discards.
    fill = observations[jnp.argmin(missing)]
    fill = jnp.where(jnp.isnan(fill), jnp.zeros_like(fill), fill)
    expanded = missing.reshape((num_steps,) + (1,) * (observations.ndim - 1))
    return missing, jnp.where(expanded, fill, observations)


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
