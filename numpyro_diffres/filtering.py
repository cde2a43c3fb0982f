"""The particle filter, built from two pure blocks and a scan.

`init` weights the first cloud, `step` resamples, moves and weights it once; both return
`(FilterState, FilterInfo)`, in the style of blackjax kernels. `particle_filter` is the scan
over them plus the policy for an impossible step. Smoothing, forecasting and the NumPyro
handlers build on the same blocks.

Per step $t$ the log-likelihood increment is
$\\log \\sum_i \\exp(\\bar l_{t-1,i} + \\log g(y_t \\mid x_{t,i}))$ with $\\bar l_{t-1}$ the
normalised log-weights after resampling (uniform after index or diffusion resampling, so this
is $\\log \\frac1N \\sum_i g(y_t \\mid x_{t,i})$). The first increment includes its $1/N$: the
sum of increments estimates $\\log p(y_{0:T-1})$ with no $\\log N$ offset.

Many series: with `batch_shape=(S,)` the filter runs $S$ independent filters as one. A
particle is then the stack `(S, *state_shape)` of all series' states, so model callables
written for one particle and closing over parameters of shape `(S,)` (drawn in a
`numpyro.plate`) broadcast over the series unchanged; log-weights have shape `(N, S)`, and
each series is normalised, resampled (with its own key) and summarised separately.
"""

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.checks import (
    check_callable,
    check_count,
    check_fraction,
    check_optional_bool,
    particle_dtype,
)
from numpyro_diffres.guards import fill_missing, guard, safe_log_prob
from numpyro_diffres.resampling import Resampler, adaptive, diffusion
from numpyro_diffres.ssm import StateSpaceModel, warn_no_rsample
from numpyro_diffres.weights import effective_sample_size, log_normalize, weighted_moments

__all__ = [
    "FilterInfo",
    "FilterResult",
    "FilterState",
    "ParticleModel",
    "init",
    "particle_filter",
    "run_filter",
    "state_space_kernel",
    "step",
]

Constrain = Callable[[Array], Array]

# `checkpoint=None` rematerialises the steps in the reverse pass above this many particle
# coordinates summed over time steps (N x state size x T, times the number of series).
CHECKPOINT_SIZE = 2**20


class FilterState(NamedTuple):
    """The weighted particle cloud between two steps.

    Attributes:
        particles: shape `(N, *state_shape)`, or `(N, *batch_shape, *state_shape)` for many
            series.
        log_weights: normalised log-weights, shape `(N,)` (or `(N, *batch_shape)`, each
            series normalised separately).
        alive: bool, False once every particle has had weight zero at some step (the
            estimate is then $-\\infty$ whatever follows); a scalar, or `batch_shape`.
    """

    particles: Array
    log_weights: Array
    alive: Array


class FilterInfo(NamedTuple):
    """What one step reports.

    Attributes:
        log_likelihood_increment: $\\log p(y_t \\mid y_{0:t-1})$ estimate, a scalar.
        ess: effective sample size of the weights after observing $y_t$.
        filtered_mean: weighted mean of $x_t$, shape `state_shape`.
        filtered_variance: weighted per-coordinate variance, shape `state_shape`.

    For many series every field gains the leading `batch_shape`.
    """

    log_likelihood_increment: Array
    ess: Array
    filtered_mean: Array
    filtered_variance: Array


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

    For many series (`batch_shape` $B$) every field gains the leading $B$, series first:
    `log_likelihood` $B$, `log_likelihood_increments` and `ess` `(*B, T)`, the moments
    `(*B, T, *state_shape)`.
    """

    log_likelihood: Array
    log_likelihood_increments: Array
    ess: Array
    filtered_mean: Array
    filtered_variance: Array


class ParticleModel(Protocol):
    """What the blocks need of a model: draw the first cloud, move one particle.

    `state_space_kernel` builds one from a `StateSpaceModel`; any object with these two
    methods (e.g. one built from a NumPyro program) runs through the same `init` and `step`.
    For many series (batch shape $B$) a particle is `(*B, *state_shape)`, `initialize`
    returns log-weights `(N, *B)`, `propagate` returns `log_correction` and `log_likelihood`
    of shape $B$, and `missing` has shape $B$; `init` and `step` read $B$ off the
    log-weights.
    """

    def initialize(
        self, key: PRNGKey, num_particles: int, observation: Array, missing: Array
    ) -> tuple[Array, Array]:
        """First cloud `(N, *state_shape)` and its unnormalised log-weights `(N,)`.

        The log-weights include the $1/N$ and $\\log g(y_0 \\mid x_0)$ (0 when missing).
        """
        ...

    def propagate(
        self, key: PRNGKey, particle: Array, time: Array, observation: Array, missing: Array
    ) -> tuple[Array, Array, Array]:
        """Move one particle: `(new_particle, log_correction, log_likelihood)`.

        `log_correction` is $\\log f - \\log q$ (0 for a bootstrap move), `log_likelihood`
        is $\\log g(y_t \\mid x_t)$ (0 when missing); either is $-\\infty$ for an impossible
        particle.
        """
        ...


class _StateSpaceKernel(NamedTuple):
    model: StateSpaceModel
    dtype: jnp.dtype | None
    constrain: Constrain
    batch_shape: tuple[int, ...] = ()

    def initialize(self, key, num_particles, observation, missing):
        if self.batch_shape:
            return self._initialize_series(key, num_particles, observation, missing)
        initial, initial_valid = guard(self.model.initial)
        particles = self.constrain(_cast(initial.sample(key, (num_particles,)), self.dtype))
        log_likelihood = jax.vmap(
            lambda x: safe_log_prob(self.model.emission(x, jnp.int32(0)), observation)
        )(particles)
        log_weights = jnp.where(missing, 0.0, log_likelihood)
        log_weights = jnp.where(initial_valid, log_weights - math.log(num_particles), -jnp.inf)
        return particles, log_weights

    def propagate(self, key, particle, time, observation, missing):
        if self.batch_shape:
            return self._propagate_series(key, particle, time, observation, missing)
        new, log_correction = _move(
            self.model, key, particle, time, observation, self.dtype, missing
        )
        log_likelihood = safe_log_prob(self.model.emission(new, time), observation)
        return new, log_correction, jnp.where(missing, 0.0, log_likelihood)

    def _initialize_series(self, key, num_particles, observation, missing):
        initial, initial_valid = guard(self.model.initial)
        if tuple(initial.batch_shape) != self.batch_shape:
            # A prior shared by all series (batch_shape ()) gives each series its own draw.
            initial = initial.expand(self.batch_shape)
        particles = self.constrain(_cast(initial.sample(key, (num_particles,)), self.dtype))
        log_likelihood = jax.vmap(
            lambda x: _series_log_prob(self.model.emission(x, jnp.int32(0)), observation)
        )(particles)
        log_weights = jnp.where(missing, 0.0, log_likelihood)
        log_weights = jnp.where(initial_valid, log_weights - math.log(num_particles), -jnp.inf)
        return particles, log_weights

    def _propagate_series(self, key, particle, time, observation, missing):
        new, log_correction = _move_series(
            self.model, key, particle, time, observation, self.dtype, len(self.batch_shape), missing
        )
        log_likelihood = _series_log_prob(self.model.emission(new, time), observation)
        return new, log_correction, jnp.where(missing, 0.0, log_likelihood)


def state_space_kernel(
    model: StateSpaceModel,
    *,
    dtype: DTypeLike | None = None,
    constrain: Constrain | None = None,
    batch_shape: tuple[int, ...] = (),
) -> ParticleModel:
    """The `ParticleModel` of a `StateSpaceModel` (bootstrap, or guided with `proposal`).

    Args:
        model: the state-space model.
        dtype: optional floating dtype the drawn states are rounded to.
        constrain: optional function applied to arrays with a leading particle axis (e.g. a
            sharding constraint).
        batch_shape: the series shape $B$ of a model for many series (distributions with
            `batch_shape` $B$, see `StateSpaceModel.check`); `()` for one series.

    Returns:
        An object with `initialize` and `propagate`.
    """
    return _StateSpaceKernel(
        model, dtype, _identity if constrain is None else constrain, tuple(batch_shape)
    )


def init(
    key: PRNGKey,
    model: ParticleModel,
    observation: Array,
    *,
    num_particles: int,
    missing: Array | bool = False,
) -> tuple[FilterState, FilterInfo]:
    """Draw and weight the first cloud, $x_0^i \\sim p(x_0)$, $w_0^i \\propto g(y_0 \\mid x_0^i)$.

    Args:
        key: PRNG key.
        model: a `ParticleModel`, e.g. `state_space_kernel(ssm)`.
        observation: $y_0$ (any value of the right shape when `missing`); for many series
            `(*B, *observation_shape)`.
        num_particles: $N$.
        missing: whether $y_0$ is missing (for many series, a bool array $B$).

    Returns:
        `(state, info)`.
    """
    particles, log_weights = model.initialize(key, num_particles, observation, missing)
    if log_weights.ndim > 1:
        log_weights, increment = _normalize_series(log_weights)
        alive = jax.lax.stop_gradient(increment > -jnp.inf)
        return FilterState(particles, log_weights, alive), _info_series(
            increment, log_weights, particles
        )
    log_weights, increment = log_normalize(log_weights)
    alive = jax.lax.stop_gradient(increment > -jnp.inf)
    return FilterState(particles, log_weights, alive), _info(increment, log_weights, particles)


def step(
    key: PRNGKey,
    state: FilterState,
    time: Array,
    observation: Array,
    *,
    model: ParticleModel,
    resampler: Resampler | None,
    missing: Array | bool = False,
    constrain: Constrain | None = None,
) -> tuple[FilterState, FilterInfo]:
    """Resample, move and weight the cloud once: from $t - 1$ to $t$.

    Args:
        key: PRNG key of this step.
        state: the cloud after observing $y_{t-1}$.
        time: $t$, an int32 scalar.
        observation: $y_t$ (any value of the right shape when `missing`).
        model: a `ParticleModel`.
        resampler: applied before the move; None skips resampling.
        missing: whether $y_t$ is missing.
        constrain: optional function applied to arrays with a leading particle axis.

    Returns:
        `(state, info)` after observing $y_t$.
    """
    constrain = _identity if constrain is None else constrain
    # Many series (log-weights (N, *B)) are normalised, resampled and summarised per series;
    # the per-particle move is the same.
    batched = state.log_weights.ndim > 1
    normalize = _normalize_series if batched else log_normalize
    particles, log_weights, alive = state
    resample_key, move_key = jax.random.split(key)
    # Once every particle has had weight zero the estimate is -inf whatever follows; the
    # cloud (often overflowing, e.g. an explosive transition) is replaced by a harmless
    # placeholder so that no resampler or density sees it: its NaN derivatives would
    # otherwise reach the parameters through the discarded branches (0 * inf).
    keep = _align(alive, particles) if batched else alive
    particles = jnp.where(keep, particles, jnp.zeros_like(particles))
    if resampler is not None:
        if batched:
            new_particles, new_log_weights = _resample_series(
                resampler, resample_key, log_weights, particles
            )
        else:
            new_particles, new_log_weights = resampler(resample_key, log_weights, particles)
        particles = constrain(new_particles).astype(particles.dtype)
        log_weights = normalize(constrain(new_log_weights))[0].astype(log_weights.dtype)
    move_keys = jax.random.split(move_key, particles.shape[0])
    new_particles, log_correction, log_likelihood = jax.vmap(
        lambda k, x: model.propagate(k, x, time, observation, missing)
    )(move_keys, particles)
    new_particles = constrain(new_particles)
    log_weights, increment = normalize(log_weights + log_correction + log_likelihood)
    alive = alive & jax.lax.stop_gradient(increment > -jnp.inf)
    info = (_info_series if batched else _info)(increment, log_weights, new_particles)
    return FilterState(new_particles, log_weights, alive), info


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
    batch_shape: tuple[int, ...] = (),
    series_sharding: jax.sharding.NamedSharding | None = None,
    checkpoint: bool | None = None,
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
        batch_shape: for many independent series at once, their shape $B$, e.g. `(S,)`:
            the model's distributions then have `batch_shape` $B$ (parameters with a leading
            series axis; see `StateSpaceModel.check`), `observations` have shape
            `(*B, T, *observation_shape)` (shorter series NaN-padded at the end), and the
            result's fields gain the leading $B$. Each series gets its own noise from `key`,
            its own normalisation and its own resampling; one trace and one compilation run
            them all. Default `()`: one series.
        series_sharding: optional `NamedSharding` whose `PartitionSpec` names the mesh axes
            of the series axes $B$, e.g. `NamedSharding(mesh, PartitionSpec("series"))`: the
            series are split across devices (combined with `particle_sharding` when both are
            given on the same mesh). Needs `batch_shape`; $B$ must split evenly.
        checkpoint: whether the gradient recomputes each step's forward pass
            (`jax.checkpoint`) instead of storing its intermediates: memory then grows with
            one cloud per step instead of the resampler's intermediates (for diffusion about
            $2K + 1$ clouds per step), at the price of a second forward pass through every
            step (`benchmarks/results/cost.md` has its measured cost). Default None:
            only when $N \\times$ state size $\\times T$ (times the series) exceeds
            `filtering.CHECKPOINT_SIZE` ($2^{20}$), e.g. $N = 1024$ particles of one
            coordinate over more than 1024 steps.

    Returns:
        A `FilterResult`.

    Raises:
        ValueError: bad `num_particles`, `ess_threshold`, `batch_shape` or observation shape,
            or a `dtype` for a model whose states are not floating point.
        TypeError: `resampler` is not callable, `particle_sharding` is not a `Sharding`,
            `series_sharding` is not a `NamedSharding`, `dtype` is not a floating dtype, or
            `checkpoint` is not a bool or None.
    """
    num_particles = check_count("num_particles", num_particles, minimum=2)
    ess_threshold = check_fraction("ess_threshold", ess_threshold)
    if particle_sharding is not None and not isinstance(particle_sharding, jax.sharding.Sharding):
        raise TypeError(
            "particle_sharding must be a jax.sharding.Sharding (e.g. a NamedSharding over the "
            f"particle axis) or None; got {particle_sharding!r}."
        )
    if dtype is not None:
        dtype = particle_dtype(dtype)
    checkpoint = check_optional_bool("checkpoint", checkpoint)
    resampler = diffusion() if resampler is None else resampler
    check_callable(
        "resampler",
        resampler,
        "resampler(key, log_weights, particles)",
        "numpyro_diffres.resampling.diffusion()",
    )
    batch_shape = _check_batch_shape(batch_shape)
    if series_sharding is not None and not batch_shape:
        raise ValueError(
            "series_sharding splits the series axes: it needs batch_shape=(S,) (many series)."
        )
    observations = jnp.asarray(observations)
    if batch_shape:
        info = _check_series(model, observations, batch_shape)
    else:
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

    constrain = _identity
    if series_sharding is not None:
        sharding = _series_sharding(series_sharding, particle_sharding, batch_shape, num_particles)

        def constrain(array):
            return jax.lax.with_sharding_constraint(array, sharding)

    elif particle_sharding is not None:
        sharding = _auto_sharding(particle_sharding, num_particles)

        def constrain(array):
            return jax.lax.with_sharding_constraint(array, sharding)

    kernel = state_space_kernel(model, dtype=dtype, constrain=constrain, batch_shape=batch_shape)
    resampler = None if ess_threshold <= 0.0 else adaptive(resampler, ess_threshold)
    return run_filter(
        key,
        kernel,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        constrain=constrain,
        batch_shape=batch_shape,
        checkpoint=checkpoint,
    )


def run_filter(
    key: PRNGKey,
    model: ParticleModel,
    observations: Array,
    *,
    num_particles: int,
    resampler: Resampler | None,
    constrain: Constrain | None = None,
    batch_shape: tuple[int, ...] = (),
    checkpoint: bool | None = None,
) -> FilterResult:
    """The scan of `step` over $t = 1..T-1$ after `init`, for any `ParticleModel`.

    Arguments are checked by the callers (`particle_filter` and the NumPyro handlers).
    With `checkpoint` each step is rematerialised in the reverse pass (`jax.checkpoint`), so
    the gradient keeps one cloud per time step rather than every intermediate of the
    resampler, at the price of running every step's forward pass twice; `None` checkpoints
    when the filter holds more than `CHECKPOINT_SIZE` particle coordinates over all steps
    (see `particle_filter`). A $-\\infty$ estimate has gradient zero.

    With a non-empty `batch_shape` $B$ the observations are `(*B, T, *observation_shape)`,
    missing steps are found per series, and the result is series-first (see `FilterResult`);
    a series whose estimate is $-\\infty$ has gradient zero.

    Returns:
        A `FilterResult`.
    """
    batch_shape = tuple(batch_shape)
    num_batch = len(batch_shape)
    if batch_shape:
        missing, filled = _fill_missing_series(observations, batch_shape)
    else:
        missing, filled = fill_missing(observations)
    initial_key, steps_key = jax.random.split(key)
    state, first = init(
        initial_key, model, filled[0], num_particles=num_particles, missing=missing[0]
    )

    num_steps = filled.shape[0]
    if checkpoint is None:
        checkpoint = state.particles.size * num_steps > CHECKPOINT_SIZE

    def body(state, inputs):
        step_key, t, y, y_missing = inputs
        return step(
            step_key,
            state,
            t,
            y,
            model=model,
            resampler=resampler,
            missing=y_missing,
            constrain=constrain,
        )

    keys = jax.random.split(steps_key, max(num_steps - 1, 0))
    times = jnp.arange(1, num_steps, dtype=jnp.int32)
    _, rest = jax.lax.scan(
        jax.checkpoint(body) if checkpoint else body,
        state,
        (keys, times, filled[1:], missing[1:]),
    )
    increments, ess, mean, variance = (
        jnp.concatenate([jnp.expand_dims(a, 0), b], axis=0)
        for a, b in zip(first, rest, strict=True)
    )
    # A -inf estimate has gradient zero (NUTS then rejects the point cleanly), rather than the
    # finite but meaningless gradient of the terms around the impossible step.
    possible = jax.lax.stop_gradient(jnp.all(increments > -jnp.inf, axis=0))
    increments = jnp.where(possible, increments, jax.lax.stop_gradient(increments))
    if batch_shape:
        increments, ess, mean, variance = (
            jnp.moveaxis(a, 0, num_batch) for a in (increments, ess, mean, variance)
        )
    return FilterResult(jnp.sum(increments, axis=-1), increments, ess, mean, variance)


def _fill_missing_series(observations: Array, batch_shape: tuple[int, ...]) -> tuple[Array, Array]:
    """`fill_missing` per series: masks `(T, *B)`, observations `(T, *B, *event)`.

    One series' NaN padding must not touch another's observations, so each series is filled
    with a valid row of its own.
    """
    num_batch = len(batch_shape)
    num_steps = observations.shape[num_batch]
    event_shape = observations.shape[num_batch + 1 :]
    flat = observations.reshape((-1, num_steps) + event_shape)
    missing, filled = jax.vmap(fill_missing)(flat)
    missing = jnp.moveaxis(missing, 1, 0).reshape((num_steps,) + batch_shape)
    filled = jnp.moveaxis(filled, 1, 0).reshape((num_steps,) + batch_shape + event_shape)
    return missing, filled


def _align(series_values: Array, particles: Array) -> Array:
    """Reshape a per-series array `B` to broadcast against `(N, *B, *state_shape)`."""
    trailing = particles.ndim - 1 - series_values.ndim
    return series_values.reshape((1,) + series_values.shape + (1,) * trailing)


def _normalize_series(log_weights: Array) -> tuple[Array, Array]:
    """`log_normalize` of each series of `(N, *B)` log-weights: `(normalised, normalisers B)`."""
    flat = log_weights.reshape(log_weights.shape[0], -1)
    normalized, normalizer = jax.vmap(log_normalize, in_axes=1, out_axes=(1, 0))(flat)
    return normalized.reshape(log_weights.shape), normalizer.reshape(log_weights.shape[1:])


def _resample_series(
    resampler: Resampler, key: PRNGKey, log_weights: Array, particles: Array
) -> tuple[Array, Array]:
    """Resample each series separately, with its own key from `key`."""
    num_particles = particles.shape[0]
    num_batch = log_weights.ndim - 1
    state_shape = particles.shape[1 + num_batch :]
    flat_particles = particles.reshape((num_particles, -1) + state_shape)
    flat_log_weights = log_weights.reshape(num_particles, -1)
    keys = jax.random.split(key, flat_log_weights.shape[1])
    new_particles, new_log_weights = jax.vmap(resampler, in_axes=(0, 1, 1), out_axes=(1, 1))(
        keys, flat_log_weights, flat_particles
    )
    return new_particles.reshape(particles.shape), new_log_weights.reshape(log_weights.shape)


def _info_series(increment: Array, log_weights: Array, particles: Array) -> FilterInfo:
    values = particles.astype(log_weights.dtype)
    weights = jnp.exp(log_weights).reshape(
        log_weights.shape + (1,) * (values.ndim - log_weights.ndim)
    )
    mean = jnp.sum(weights * values, axis=0)
    variance = jnp.sum(weights * (values - mean) ** 2, axis=0)
    ess = jnp.exp(-jax.scipy.special.logsumexp(2.0 * log_weights, axis=0))
    return FilterInfo(increment, ess, mean, variance)


def _series_log_prob(distribution, value: Array) -> Array:
    """`log_prob` per series (`batch_shape`), $-\\infty$ with finite gradient where impossible.

    The many-series counterpart of `safe_log_prob`: an impossible value in one series (outside
    the support, a non-finite density) is evaluated again at a feasible point of that series
    only, so the other series keep their densities and gradients. Invalid parameters make
    every series impossible (the joint density is zero anyway).
    """
    safe, valid = guard(distribution)
    log_prob = safe.log_prob(value)
    possible = jax.lax.stop_gradient(valid & jnp.isfinite(log_prob))
    mask = possible.reshape(possible.shape + (1,) * len(safe.event_shape))
    point = jnp.where(mask, value, safe.support.feasible_like(value))
    return jnp.where(possible, safe.log_prob(point), -jnp.inf)


def _move_series(
    model: StateSpaceModel,
    key: PRNGKey,
    x: Array,
    t: Array,
    y: Array,
    dtype: jnp.dtype | None,
    num_batch: int,
    missing: Array | bool = False,
) -> tuple[Array, Array]:
    transition, transition_valid = guard(model.transition(x, t))
    batch_shape = x.shape[:num_batch]
    if model.proposal is None:
        new = _cast(transition.sample(key), dtype)
        correction = jnp.zeros(batch_shape, _weight_dtype(new))
    else:
        proposal, proposal_valid = guard(model.proposal(x, t, y))
        # A missing y_t has nothing to guide the proposal (it would see the filler value):
        # such a series moves by the transition, with no weight correction.
        missing = jnp.broadcast_to(missing, batch_shape)
        new = jnp.where(
            missing.reshape(batch_shape + (1,) * (x.ndim - num_batch)),
            _cast(transition.sample(key), dtype),
            _cast(proposal.sample(key), dtype),
        )
        correction = _series_log_prob(transition, new) - _series_log_prob(proposal, new)
        correction = jnp.where(proposal_valid, correction, -jnp.inf)
        correction = jnp.where(missing, 0.0, correction)
    correction = jnp.where(transition_valid, correction, -jnp.inf)
    if jnp.issubdtype(new.dtype, jnp.floating):
        finite = jnp.all(jnp.isfinite(new), axis=tuple(range(num_batch, new.ndim)))
        new = jnp.where(finite.reshape(finite.shape + (1,) * (new.ndim - num_batch)), new, 0)
        correction = jnp.where(finite, correction, -jnp.inf)
    return new, correction


def _check_batch_shape(batch_shape: object) -> tuple[int, ...]:
    if not isinstance(batch_shape, tuple | list) or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1
        for size in batch_shape
    ):
        raise TypeError(
            f"batch_shape must be a tuple of positive ints (the series shape, e.g. (S,)), got "
            f"{batch_shape!r}."
        )
    return tuple(int(size) for size in batch_shape)


def _check_series(model: StateSpaceModel, observations: Array, batch_shape: tuple[int, ...]):
    num_batch = len(batch_shape)
    shape = tuple(observations.shape)
    if (
        observations.ndim < num_batch + 1
        or shape[:num_batch] != batch_shape
        or shape[num_batch] < 1
    ):
        raise ValueError(
            f"with batch_shape={batch_shape} (one filter per series), observations must have "
            f"shape ({_dims(batch_shape)}, T, *observation_shape): the series axes first, then "
            f"time (shorter series NaN-padded at the end); got {shape}."
        )
    return model.check(shape[num_batch + 1 :], batch_shape=batch_shape)


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(str(size) for size in shape)


def _series_sharding(
    series_sharding: object,
    particle_sharding: jax.sharding.Sharding | None,
    batch_shape: tuple[int, ...],
    num_particles: int,
) -> jax.sharding.Sharding:
    """The sharding of `(N, *B, ...)` arrays from the series (and particle) shardings."""
    if not isinstance(series_sharding, jax.sharding.NamedSharding):
        raise TypeError(
            "series_sharding must be a jax.sharding.NamedSharding naming the mesh axis of the "
            f"series, e.g. NamedSharding(mesh, PartitionSpec('series')); got {series_sharding!r}."
        )
    try:
        series_sharding.shard_shape(batch_shape)
    except ValueError as error:
        raise ValueError(
            f"batch_shape={batch_shape} does not split evenly over series_sharding "
            f"{series_sharding}: choose a number of series divisible by the number of shards."
        ) from error
    spec = tuple(series_sharding.spec) + (None,) * (len(batch_shape) - len(series_sharding.spec))
    particle_axis = None
    if particle_sharding is not None:
        if not (
            isinstance(particle_sharding, jax.sharding.NamedSharding)
            and particle_sharding.mesh.shape == series_sharding.mesh.shape
            and particle_sharding.mesh.axis_names == series_sharding.mesh.axis_names
        ):
            raise ValueError(
                "particle_sharding and series_sharding together must be NamedShardings on the "
                "same mesh, e.g. a mesh with axes ('particles', 'series')."
            )
        particle_axis = tuple(particle_sharding.spec)[0] if particle_sharding.spec else None
    combined = jax.sharding.NamedSharding(
        series_sharding.mesh, jax.sharding.PartitionSpec(particle_axis, *spec)
    )
    if particle_axis is not None:
        try:
            combined.shard_shape((num_particles, *batch_shape))
        except ValueError as error:
            raise ValueError(
                f"num_particles={num_particles} does not split evenly over particle_sharding "
                f"{particle_sharding}: choose num_particles divisible by the number of shards."
            ) from error
    return _auto_axes(combined)


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
    return _auto_axes(sharding)


def _auto_axes(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
        auto = jax.sharding.AxisType.Auto
        if any(axis_type != auto for axis_type in mesh.axis_types):
            mesh = jax.sharding.Mesh(
                mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names)
            )
            sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
    return sharding


def _identity(array: Array) -> Array:
    return array


def _info(increment: Array, log_weights: Array, particles: Array) -> FilterInfo:
    values = particles.astype(log_weights.dtype)
    mean, variance = weighted_moments(log_weights, values)
    return FilterInfo(increment, effective_sample_size(log_weights), mean, variance)


def _move(
    model: StateSpaceModel,
    key: PRNGKey,
    x: Array,
    t: Array,
    y: Array,
    dtype: jnp.dtype | None,
    missing: Array | bool = False,
) -> tuple[Array, Array]:
    transition, transition_valid = guard(model.transition(x, t))
    if model.proposal is None:
        new = _cast(transition.sample(key), dtype)
        correction = jnp.zeros((), _weight_dtype(new))
    else:
        proposal, proposal_valid = guard(model.proposal(x, t, y))
        # A missing y_t has nothing to guide the proposal (it would see the filler value): the
        # particle moves by the transition, with no weight correction.
        new = jnp.where(
            missing, _cast(transition.sample(key), dtype), _cast(proposal.sample(key), dtype)
        )
        correction = safe_log_prob(transition, new) - safe_log_prob(proposal, new)
        correction = jnp.where(proposal_valid, correction, -jnp.inf)
        correction = jnp.where(missing, 0.0, correction)
    correction = jnp.where(transition_valid, correction, -jnp.inf)
    if jnp.issubdtype(new.dtype, jnp.floating):
        finite = jnp.all(jnp.isfinite(new))
        # Sanitise so a non-finite state (invalid parameters) cannot leak NaN downstream.
        new = jnp.where(finite, new, jnp.zeros_like(new))
        correction = jnp.where(finite, correction, -jnp.inf)
    return new, correction


def _cast(x: Array, dtype: jnp.dtype | None) -> Array:
    return x if dtype is None else x.astype(dtype)


def _weight_dtype(x: Array) -> jnp.dtype:
    """The dtype of a log-weight for state `x`: its own if floating, else JAX's default float."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
