"""The particle filter driven by explicit standard-normal noise.

For pseudo-marginal samplers the filter's randomness $u$ is part of the chain's state: every
random draw of one filter run is a deterministic function of one array of standard normals,

* each particle's move $x_t^i = F(u_t^i)$: the transition (or proposal) distribution's draw
  from its standard-normal noise: $\\mu + \\sigma u$ for a normal, $\\mu + L u$ for a
  multivariate normal, the same through the transforms of a transformed distribution (e.g. a
  log-normal), $F^{-1}(\\Phi(u))$ for any other univariate family with an inverse CDF;
* each step's resampling: systematic resampling with the uniform $\\Phi(u_t)$ over the
  particles *sorted* along one axis (the state itself in one dimension; the first coordinate
  of the flattened state otherwise).

Systematic resampling over any fixed order keeps the estimate unbiased, so pseudo-marginal MCMC
on it stays exact; sorting makes the estimate at nearby $(\\theta, u)$ nearby, which is what
the correlated pseudo-marginal method (Deligiannidis, Doucet and Pitt 2018) needs: moving $u$
by Crank-Nicolson then gives strongly correlated successive estimates. In more than one
dimension a Hilbert-curve order would keep more of the correlation than one coordinate.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import ndtr
from numpyro.distributions import Distribution

from numpyro_diffres._log_density import fill_missing, guard, log_normalize, safe_log_prob
from numpyro_diffres._typing import Array
from numpyro_diffres.filtering import FilterResult, _info_series, _series_log_prob
from numpyro_diffres.ssm import StateSpaceModel

__all__ = [
    "FilterNoise",
    "draw_from_noise",
    "noise_filter",
    "noise_shape",
    "sorted_systematic",
    "unflatten_noise",
]

SUPPORTED = (
    "Normal, MultivariateNormal, TransformedDistribution of those (e.g. LogNormal), "
    "Independent/expanded versions of them, Delta, and univariate families with an inverse CDF "
    "(e.g. Uniform, Cauchy, Laplace, Gumbel, Exponential)"
)


class FilterNoise(NamedTuple):
    """Every random number of one filter run, as standard normals.

    Attributes:
        initial: the first cloud's noise, `(N, *state)` (for many series `(N, *B, *state)`).
        transition: each later step's moves, `(T - 1, N, *state)`.
        resampling: each later step's resampling uniform (through $\\Phi$), `(T - 1, *B)`.
    """

    initial: Array
    transition: Array
    resampling: Array


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


def sorted_systematic(uniform: Array, log_weights: Array, particles: Array) -> Array:
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


def noise_filter(
    noise: FilterNoise,
    model: StateSpaceModel,
    observations: Array,
    *,
    batch_shape: tuple[int, ...] = (),
) -> FilterResult:
    """Run the bootstrap (or guided) particle filter on explicit noise.

    Every step resamples (sorted systematic from $\\Phi$ of the step's resampling noise), so
    the log-likelihood estimate is unbiased; the number of particles is `noise.initial`'s
    first axis.

    Args:
        noise: a `FilterNoise` of standard normals.
        model: the state-space model (transitions of a family `draw_from_noise` supports).
        observations: `(T, *observation_shape)` (for many series `(*B, T, ...)`); NaN rows
            are missing.
        batch_shape: the series shape $B$; see `particle_filter`.

    Returns:
        A `FilterResult` (series-first for many series).
    """
    batch_shape = tuple(batch_shape)
    num_batch = len(batch_shape)
    observations = jnp.moveaxis(jnp.asarray(observations), num_batch, 0)
    missing, filled = _missing_per_series(observations, num_batch)
    log_prob = _series_log_prob if batch_shape else safe_log_prob
    num_particles = noise.initial.shape[0]

    def weigh(particles, time, observation, observed):
        log_g = jax.vmap(lambda x: log_prob(model.emission(x, time), observation))(particles)
        return jnp.where(observed, log_g, 0.0)

    initial, initial_valid = guard(model.initial)
    if num_batch and tuple(initial.batch_shape) != batch_shape:
        initial = initial.expand(batch_shape)
    particles = jax.vmap(lambda u: draw_from_noise(initial, u))(noise.initial)
    log_weights = weigh(particles, jnp.int32(0), filled[0], ~missing[0])
    log_weights = jnp.where(initial_valid, log_weights - math.log(num_particles), -jnp.inf)
    log_weights, first = _normalize(log_weights)

    def step(carry, inputs):
        particles, log_weights = carry
        time, observation, step_missing, move_noise, resample_noise = inputs
        ancestors = _ancestors(ndtr(resample_noise), log_weights, particles, num_batch)
        particles = _gather(particles, ancestors, num_batch)
        moved, correction = jax.vmap(
            lambda x, u: _move(model, x, u, time, observation, step_missing, num_batch)
        )(particles, move_noise)
        log_g = weigh(moved, time, observation, ~step_missing)
        log_weights, increment = _normalize(log_g + correction - math.log(num_particles))
        return (moved, log_weights), _info_series(increment, log_weights, moved)

    times = jnp.arange(1, filled.shape[0], dtype=jnp.int32)
    inputs = (times, filled[1:], missing[1:], noise.transition, noise.resampling)
    _, rest = jax.lax.scan(step, (particles, log_weights), inputs)
    first = _info_series(first, log_weights, particles)
    increments, ess, mean, variance = (
        jnp.concatenate([a[None], b], axis=0) for a, b in zip(first, rest, strict=True)
    )
    possible = jax.lax.stop_gradient(jnp.all(increments > -jnp.inf, axis=0))
    increments = jnp.where(possible, increments, jax.lax.stop_gradient(increments))
    increments, ess, mean, variance = (
        jnp.moveaxis(a, 0, num_batch) for a in (increments, ess, mean, variance)
    )
    return FilterResult(jnp.sum(increments, axis=-1), increments, ess, mean, variance)


def _missing_per_series(observations: Array, num_batch: int) -> tuple[Array, Array]:
    """Missing masks `(T, *B)` and filled observations, each series filled with its own rows."""
    if num_batch == 0:
        return fill_missing(observations)
    time_first = jnp.moveaxis(observations, 0, num_batch)
    batch = time_first.shape[:num_batch]
    flat = time_first.reshape((-1,) + time_first.shape[num_batch:])
    missing, filled = jax.vmap(fill_missing)(flat)
    missing = jnp.moveaxis(missing.reshape(batch + missing.shape[1:]), num_batch, 0)
    filled = jnp.moveaxis(filled.reshape(batch + filled.shape[1:]), num_batch, 0)
    return missing, filled


def _normalize(log_weights: Array) -> tuple[Array, Array]:
    """`log_normalize` over the particle axis of `(N, *B)` log-weights."""
    flat = log_weights.reshape(log_weights.shape[0], -1)
    normalized, normalizer = jax.vmap(log_normalize, in_axes=1, out_axes=(1, 0))(flat)
    return normalized.reshape(log_weights.shape), normalizer.reshape(log_weights.shape[1:])


def _ancestors(uniforms: Array, log_weights: Array, particles: Array, num_batch: int) -> Array:
    """`sorted_systematic` per series: ancestors `(N, *B)`."""
    if num_batch == 0:
        return sorted_systematic(uniforms, log_weights, particles)
    num_particles = log_weights.shape[0]
    flat_weights = log_weights.reshape(num_particles, -1)
    flat_particles = particles.reshape((num_particles, flat_weights.shape[1], -1))
    ancestors = jax.vmap(sorted_systematic, in_axes=(0, 1, 1), out_axes=1)(
        uniforms.reshape(-1), flat_weights, flat_particles
    )
    return ancestors.reshape(log_weights.shape)


def _gather(particles: Array, ancestors: Array, num_batch: int) -> Array:
    """Each series' particles at its own ancestors."""
    if num_batch == 0:
        return particles[ancestors]
    trailing = particles.ndim - 1 - num_batch
    index = ancestors.reshape(ancestors.shape + (1,) * trailing)
    return jnp.take_along_axis(particles, index, axis=0)


def _move(model, x, u, time, observation, missing, num_batch):
    """One particle's move from its noise: `(new, log f - log q)` (0 for a bootstrap move)."""
    transition, transition_valid = guard(model.transition(x, time))
    log_prob = _series_log_prob if num_batch else safe_log_prob
    if model.proposal is None:
        new = draw_from_noise(transition, u)
        correction = jnp.zeros(x.shape[:num_batch], new.dtype)
    else:
        proposal, proposal_valid = guard(model.proposal(x, time, observation))
        guided = draw_from_noise(proposal, u)
        # A missing y_t has nothing to guide the proposal: move by the transition.
        mask = missing.reshape(missing.shape + (1,) * (x.ndim - num_batch))
        new = jnp.where(mask, draw_from_noise(transition, u), guided)
        correction = log_prob(transition, new) - log_prob(proposal, new)
        correction = jnp.where(proposal_valid & ~missing, correction, 0.0)
        correction = jnp.where(proposal_valid | missing, correction, -jnp.inf)
    correction = jnp.where(transition_valid, correction, -jnp.inf)
    axes = tuple(range(num_batch, new.ndim))
    finite = jnp.all(jnp.isfinite(new), axis=axes) if axes else jnp.isfinite(new)
    new = jnp.where(finite.reshape(finite.shape + (1,) * len(axes)), new, jnp.zeros_like(new))
    return new, jnp.where(finite, correction, -jnp.inf)
