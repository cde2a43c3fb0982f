"""The particle filter: a `lax.scan` over time in log space.

Per step $t$ the log-likelihood increment is
$\\log \\sum_i \\exp(\\bar l_{t-1,i} + \\log g(y_t \\mid x_{t,i}))$ with $\\bar l_{t-1}$ the
normalised log-weights after resampling (uniform after index or diffusion resampling, so this
is $\\log \\frac1N \\sum_i g(y_t \\mid x_{t,i})$). The first increment includes its $1/N$: the
sum of increments estimates $\\log p(y_{0:T-1})$ with no $\\log N$ offset.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.typing import DTypeLike
from numpyro.distributions import Distribution, constraints

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.resampling import Resampler, diffusion
from numpyro_diffres.ssm import StateSpaceModel, warn_no_rsample
from numpyro_diffres.weights import effective_sample_size, log_normalize, weighted_moments

__all__ = ["FilterResult", "particle_filter"]


class FilterResult(NamedTuple):
    """What `particle_filter` returns.

    Attributes:
        log_likelihood: estimate of $\\log p(y_{0:T-1})$, a scalar; $-\\infty$ when every
            particle has zero weight at some step (e.g. parameters outside their support, an
            infinite observation), and then its gradient is exactly zero.
        log_likelihood_increments: per-time terms, shape `(T,)`, summing to `log_likelihood`.
        ess: effective sample size of the weights after observing $y_t$, shape `(T,)`.
        filtered_mean: weighted mean of $x_t$ given $y_{0:t}$, shape `(T, *state_shape)`.
        filtered_variance: weighted per-coordinate variance, shape `(T, *state_shape)`.
    """

    log_likelihood: Array
    log_likelihood_increments: Array
    ess: Array
    filtered_mean: Array
    filtered_variance: Array


def particle_filter(
    key: PRNGKey,
    model: StateSpaceModel,
    observations: Array,
    *,
    num_particles: int,
    resampler: Resampler | None = None,
    ess_threshold: float = 1.0,
    particle_sharding: jax.sharding.Sharding | None = None,
    dtype: DTypeLike | None = None,
) -> FilterResult:
    """Run a (bootstrap or guided) particle filter and estimate the log-likelihood.

    With the default diffusion resampler and a fixed `key`, the estimate is a smooth function of
    the model parameters (common random numbers), so `jax.grad` of it is the pathwise gradient
    of a consistent (as `num_particles` grows), not unbiased, estimator.

    Args:
        key: PRNG key; the same key gives the same noise (and a smooth likelihood surface).
        model: the state-space model.
        observations: shape `(T, *observation_shape)`. A time step containing NaN is missing:
            it contributes no weight update and an increment of 0.
        num_particles: $N \\ge 2$.
        resampler: any resampler `(key, log_weights, particles) -> (particles, log_weights)`;
            default `resampling.diffusion()`.
        ess_threshold: resample when ESS < `ess_threshold * N`. The default 1.0 resamples at
            every step, which keeps the fixed-noise likelihood smooth (an ESS-triggered switch
            is itself a jump in the parameters); 0.0 never resamples.
        particle_sharding: optional `jax.sharding.Sharding` for arrays whose leading axis is
            the particle axis, e.g. `NamedSharding(jax.make_mesh((4,), ("particles",)),
            PartitionSpec("particles"))`: the particles and log-weights are constrained to it
            at every step, so under `jit` XLA splits the per-particle work (and the
            resampler's matrix products) across devices. Random draws do not depend on the
            sharding (JAX's partitionable threefry), so the result equals the one-device result
            to rounding. `num_particles` must be divisible by the number of shards.
        dtype: optional floating dtype for the particles (and so for the resampler), e.g.
            `jnp.float32` inside a float64 program: each drawn state is rounded to it, while
            the weights keep the precision the model's densities give them. Random draws are
            made at JAX's default precision, so with x64 enabled the same key gives a float32
            and a float64 run the same noise up to rounding: their difference is the rounding
            error of single precision alone. Default: the initial distribution's dtype.

    Returns:
        A `FilterResult`.

    Raises:
        ValueError: bad `num_particles`, `ess_threshold` or observation shape, or a `dtype`
            for a model whose states are not floating point.
        TypeError: `resampler` is not callable, `particle_sharding` is not a `Sharding`, or
            `dtype` is not a floating dtype.
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, int):
        raise TypeError(f"num_particles must be an int >= 2, got {num_particles!r}.")
    if num_particles < 2:
        raise ValueError(f"num_particles must be >= 2, got {num_particles}.")
    if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float)):
        raise TypeError(f"ess_threshold must be a number in [0, 1], got {ess_threshold!r}.")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must lie in [0, 1], got {ess_threshold!r}.")
    if particle_sharding is not None and not isinstance(particle_sharding, jax.sharding.Sharding):
        raise TypeError(
            "particle_sharding must be a jax.sharding.Sharding (e.g. a NamedSharding over the "
            f"particle axis) or None; got {particle_sharding!r}."
        )
    if dtype is not None:
        dtype = _floating_dtype(dtype)
    resampler = diffusion() if resampler is None else resampler
    if not callable(resampler):
        raise TypeError(
            "resampler must be callable as resampler(key, log_weights, particles), e.g. "
            f"numpyro_diffres.resampling.diffusion(); got {resampler!r}."
        )
    observations = jnp.asarray(observations)
    if observations.ndim < 1 or observations.shape[0] < 1:
        raise ValueError(
            f"observations must have shape (T, *observation_shape) with T >= 1, got "
            f"{observations.shape}."
        )
    info = model.check(observations.shape[1:])
    if dtype is not None and not jnp.issubdtype(info.state_dtype, jnp.floating):
        raise ValueError(
            f"dtype={dtype} applies to floating-point states; this model's initial distribution "
            f"draws {info.state_dtype} states. Leave dtype=None for discrete states."
        )
    if not info.initial_has_rsample:
        warn_no_rsample("initial")
    if not info.transition_has_rsample and model.proposal is None:
        warn_no_rsample("transition")

    n = num_particles
    if particle_sharding is not None:
        particle_sharding = _auto_sharding(particle_sharding, n)

    def constrain(*arrays):
        if particle_sharding is None:
            return arrays
        return tuple(jax.lax.with_sharding_constraint(a, particle_sharding) for a in arrays)

    missing, filled = _missing(observations)
    initial_key, steps_key = jax.random.split(key)
    initial, initial_valid = _guard(model.initial)
    (particles,) = constrain(_cast(initial.sample(initial_key, (n,)), dtype))
    log_likelihood = jax.vmap(lambda x: _log_prob(model.emission(x, jnp.int32(0)), filled[0]))(
        particles
    )
    log_weights = jnp.where(missing[0], 0.0, log_likelihood)
    log_weights = jnp.where(initial_valid, log_weights - math.log(n), -jnp.inf)
    log_weights, increment = log_normalize(log_weights)
    first = (increment, *_summaries(log_weights, particles))

    always = ess_threshold >= 1.0
    never = ess_threshold <= 0.0

    def resample(key, particles, log_weights):
        new_particles, new_log_weights = constrain(*resampler(key, log_weights, particles))
        return new_particles.astype(particles.dtype), log_normalize(new_log_weights)[0].astype(
            log_weights.dtype
        )

    @jax.checkpoint
    def step(carry, inputs):
        particles, log_weights, alive = carry
        step_key, t, y, y_missing = inputs
        resample_key, move_key = jax.random.split(step_key)
        # Once every particle has had weight zero the estimate is -inf whatever follows; the
        # cloud (often overflowing, e.g. an explosive transition) is replaced by a harmless
        # placeholder so that no resampler or density sees it: its NaN derivatives would
        # otherwise reach the parameters through the discarded branches (0 * inf).
        particles = jnp.where(alive, particles, jnp.zeros_like(particles))
        if always:
            particles, log_weights = resample(resample_key, particles, log_weights)
        elif not never:
            particles, log_weights = jax.lax.cond(
                effective_sample_size(log_weights) < ess_threshold * n,
                resample,
                lambda _, p, lw: (p, lw),
                resample_key,
                particles,
                log_weights,
            )
        move_keys = jax.random.split(move_key, n)
        new_particles, log_correction = constrain(
            *jax.vmap(lambda k, x: _propagate(model, k, x, t, y, dtype))(move_keys, particles)
        )
        log_likelihood = jax.vmap(lambda x: _log_prob(model.emission(x, t), y))(new_particles)
        log_likelihood = jnp.where(y_missing, 0.0, log_likelihood)
        log_weights, increment = log_normalize(log_weights + log_correction + log_likelihood)
        summaries = (increment, *_summaries(log_weights, new_particles))
        alive = alive & jax.lax.stop_gradient(increment > -jnp.inf)
        return (new_particles, log_weights, alive), summaries

    num_steps = observations.shape[0]
    keys = jax.random.split(steps_key, max(num_steps - 1, 0))
    times = jnp.arange(1, num_steps, dtype=jnp.int32)
    alive = jax.lax.stop_gradient(increment > -jnp.inf)
    _, rest = jax.lax.scan(
        step, (particles, log_weights, alive), (keys, times, filled[1:], missing[1:])
    )
    increments, ess, mean, variance = (
        jnp.concatenate([jnp.expand_dims(a, 0), b], axis=0)
        for a, b in zip(first, rest, strict=True)
    )
    # A -inf estimate has gradient zero (NUTS then rejects the point cleanly), rather than the
    # finite but meaningless gradient of the terms around the impossible step.
    possible = jax.lax.stop_gradient(jnp.all(increments > -jnp.inf))
    increments = jnp.where(possible, increments, jax.lax.stop_gradient(increments))
    return FilterResult(jnp.sum(increments), increments, ess, mean, variance)


def _floating_dtype(dtype: DTypeLike) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype such as jnp.float32, got {dtype!r}.")
    # float64 without x64 would silently be float32: say so instead.
    if jax.dtypes.canonicalize_dtype(resolved) != resolved:
        raise ValueError(
            f"dtype={resolved} needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
            "first, or use jnp.float32."
        )
    return resolved


def _auto_sharding(sharding: jax.sharding.Sharding, num_particles: int) -> jax.sharding.Sharding:
    """Check that the particle axis splits evenly; give a named mesh JAX's automatic axes.

    `jax.make_mesh` makes explicit-mode axes by default, which `with_sharding_constraint`
    refuses; the filter only states where the particle axis lives and lets XLA propagate the
    rest, so the same devices and axis names are re-wrapped as automatic axes.
    """
    try:
        sharding.shard_shape((num_particles,))
    except ValueError as error:
        raise ValueError(
            f"num_particles={num_particles} does not split evenly over particle_sharding "
            f"{sharding}: choose num_particles divisible by the number of particle shards."
        ) from error
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
        auto = jax.sharding.AxisType.Auto
        if any(axis_type != auto for axis_type in mesh.axis_types):
            mesh = jax.sharding.Mesh(
                mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names)
            )
            sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
    return sharding


def _summaries(log_weights: Array, particles: Array) -> tuple[Array, Array, Array]:
    values = particles.astype(log_weights.dtype)
    mean, variance = weighted_moments(log_weights, values)
    return effective_sample_size(log_weights), mean, variance


def _propagate(
    model: StateSpaceModel, key: PRNGKey, x: Array, t: Array, y: Array, dtype: jnp.dtype | None
):
    transition, transition_valid = _guard(model.transition(x, t))
    if model.proposal is None:
        new = _cast(transition.sample(key), dtype)
        correction = jnp.zeros((), _float_dtype(new))
    else:
        proposal, proposal_valid = _guard(model.proposal(x, t, y))
        new = _cast(proposal.sample(key), dtype)
        correction = _log_prob(transition, new) - _log_prob(proposal, new)
        correction = jnp.where(proposal_valid, correction, -jnp.inf)
    correction = jnp.where(transition_valid, correction, -jnp.inf)
    if jnp.issubdtype(new.dtype, jnp.floating):
        finite = jnp.all(jnp.isfinite(new))
        # Sanitise so a non-finite state (invalid parameters) cannot leak NaN downstream.
        new = jnp.where(finite, new, jnp.zeros_like(new))
        correction = jnp.where(finite, correction, -jnp.inf)
    return new, correction


def _cast(x: Array, dtype: jnp.dtype | None) -> Array:
    return x if dtype is None else x.astype(dtype)


def _float_dtype(x: Array):
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)


def _log_prob(distribution: Distribution, value: Array) -> Array:
    safe, valid = _guard(distribution)
    log_prob = safe.log_prob(value)
    # NaN or -inf (invalid parameters, a value outside the support, an infinite observation,
    # an overflow) is an impossible particle, not a poisoned estimate. Its gradient is NaN or
    # infinite, which the `where` below would still turn into NaN (0 * inf): such points are
    # evaluated again at a feasible parameter and value, whose gradient is finite.
    possible = jax.lax.stop_gradient(valid & jnp.isfinite(log_prob))
    feasible, _ = _guard(distribution, ~possible)
    point = jnp.where(possible, value, feasible.support.feasible_like(value))
    return jnp.where(possible, _log_density(feasible, point), -jnp.inf)


@jax.custom_jvp
def _log_density(distribution: Distribution, value: Array) -> Array:
    """`distribution.log_prob(value)` (a scalar) whose non-finite partial derivatives are zero.

    A finite log-density can still have a NaN derivative at the edge of the parameter space,
    e.g. NumPyro's Poisson term `xlogy(k, rate)` at `k = 0` and a `rate` that underflowed to
    0 (`0 / 0`), where the limit is finite (that term's derivative is then multiplied by
    `d rate = 0` anyway). Zero is the value of such entries in the limit. A JVP rule (rather
    than a VJP) keeps forward mode, hence Hessians, available.
    """
    return distribution.log_prob(value)


@_log_density.defjvp
def _log_density_jvp(primals, tangents):
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


def _guard(distribution: Distribution, replace: Array | None = None) -> tuple[Distribution, Array]:
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
        base, valid = _guard(distribution.base_dist, replace)
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


def _missing(observations: Array) -> tuple[Array, Array]:
    """Missing-time mask `(T,)` and observations with missing rows filled by a valid row."""
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
