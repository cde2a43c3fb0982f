"""The particle filter, built from two pure blocks and a scan.

`init` weights the first cloud, `step` resamples, moves and weights it once; both return
`(FilterState, FilterInfo)`, in the style of blackjax kernels. `run_filter` is the one scan
over them (optionally keeping the history smoothing needs); `particle_filter` checks its
arguments and runs it. Smoothing, forecasting and the NumPyro handlers build on the same blocks.

Per step $t$ the log-likelihood increment is
$\\log \\sum_i \\exp(\\bar l_{t-1,i} + \\log g(y_t \\mid x_{t,i}))$ with $\\bar l_{t-1}$ the
normalised log-weights after resampling (uniform after index or diffusion resampling, so this
is $\\log \\frac1N \\sum_i g(y_t \\mid x_{t,i})$). The first increment includes its $1/N$: the
sum of increments estimates $\\log p(y_{0:T-1})$ with no $\\log N$ offset.

One code path serves one series and many. Particles have shape `(N, *B, *state_shape)` and
log-weights `(N, *B)`, with $B$ the series shape: `()` for one series, `(S,)` for $S$
independent series run as one (`batch_shape=(S,)`). A particle is then the stack
`(*B, *state_shape)` of all series' states, so model callables written for one particle and
closing over parameters of shape `(S,)` (drawn in a `numpyro.plate`) broadcast over the series
unchanged; each series is normalised, resampled (with its own key) and summarised separately.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from numpyro_diffres._log_density import (
    effective_sample_size,
    fill_missing,
    log_normalize,
    weighted_moments,
)
from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.filter_arguments import (
    check_kernel,
    check_resampler_input,
    check_run_options,
)
from numpyro_diffres.filter_types import (
    FilterHistory,
    FilterInfo,
    FilterNoise,
    FilterState,
    ParticleModel,
    StepInputs,
    StepNoise,
    align,
    per_series,
)
from numpyro_diffres.resampling import Resampler, diffusion
from numpyro_diffres.ssm import StateSpaceModel
from numpyro_diffres.ssm_kernel import state_space_kernel

__all__ = [
    "FilterHistory",
    "FilterInfo",
    "FilterResult",
    "FilterRun",
    "FilterState",
    "ParticleModel",
    "StepInputs",
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


def init(
    key: PRNGKey, model: ParticleModel, inputs: StepInputs, *, num_particles: int
) -> tuple[FilterState, FilterInfo]:
    """Draw and weight the first cloud, $x_0^i \\sim p(x_0)$, $w_0^i \\propto g(y_0 \\mid x_0^i)$.

    Args:
        key: PRNG key.
        model: a `ParticleModel`, e.g. `state_space_kernel(ssm)`.
        inputs: the inputs of time 0, passed to `model.initialize` untouched.
        num_particles: $N$.

    Returns:
        `(state, info)`; `info.ancestors` is None and `info.resampled` False.
    """
    particles, log_weights = model.initialize(key, num_particles, inputs)
    # The 1/N of the first increment lives here, not in the models.
    log_weights = log_weights - math.log(num_particles)
    resampled = jnp.zeros(log_weights.shape[1:], bool)
    return _weigh(particles, log_weights, jnp.asarray(True), None, resampled)


def step(
    key: PRNGKey,
    state: FilterState,
    inputs: StepInputs,
    *,
    model: ParticleModel,
    resampler: Resampler | None = None,
    ess_threshold: float = 1.0,
    constrain: Constrain | None = None,
) -> tuple[FilterState, FilterInfo]:
    """Resample, move and weight the cloud once: from $t - 1$ to $t$.

    All randomness of the step is derived here from `key`, or given as a `StepNoise` of
    standard normals (for pseudo-marginal samplers: the model then draws from its move noise,
    and the resampler takes standard-normal noise in place of a key, `takes_noise`, as
    `resampling.sorted_systematic()` and `resampling.noise_driven(diffusion())` do). From a
    key: one key for the resampling (split per series), one per particle for the move.

    Args:
        key: PRNG key of this step, or its `StepNoise`.
        state: the cloud after observing $y_{t-1}$.
        inputs: the inputs of time $t$, passed to `model.propagate` untouched.
        model: a `ParticleModel`.
        resampler: default `resampling.diffusion()`, as in `particle_filter`.
        ess_threshold: resample a series when its ESS < `ess_threshold * N`; 1.0 resamples at
            every step, 0.0 never resamples (the resampler is then not called at all).
        constrain: optional function applied to arrays with a leading particle axis.

    Returns:
        `(state, info)` after observing $y_t$.

    Raises:
        TypeError: a resampler that takes noise given a key, or one that takes a key given
            a `StepNoise`.
    """
    resampler = diffusion() if resampler is None else resampler
    check_resampler_input(resampler, isinstance(key, StepNoise), ess_threshold)
    constrain = _identity if constrain is None else constrain
    particles, log_weights, alive = state
    if isinstance(key, StepNoise):
        resample_key, move_keys = key.resampling, key.move
    else:
        resample_key, move_key = jax.random.split(key)
        move_keys = None
    # Once every particle has had weight zero the estimate is -inf whatever follows; the
    # cloud (often overflowing, e.g. an explosive transition) is replaced by a harmless
    # placeholder so that no resampler or density sees it: its NaN derivatives would
    # otherwise reach the parameters through the discarded branches (0 * inf).
    particles = jnp.where(align(alive, particles), particles, jnp.zeros_like(particles))
    particles, log_weights, ancestors, resampled = _resample(
        resample_key, log_weights, particles, resampler, ess_threshold, constrain
    )
    if move_keys is None:
        move_keys = jax.random.split(move_key, particles.shape[0])
    new_particles, log_correction, log_likelihood = jax.vmap(
        lambda move, particle: model.propagate(move, particle, inputs)
    )(move_keys, particles)
    log_weights = log_weights + log_correction + log_likelihood
    return _weigh(constrain(new_particles), log_weights, alive, ancestors, resampled)


def _weigh(particles, log_weights, alive, ancestors, resampled):
    """Normalise unnormalised log-weights per series and summarise the cloud."""
    num_batch = log_weights.ndim - 1
    log_weights, increment = per_series(log_normalize, num_batch, log_weights, out_axes=(1, 0))
    alive = alive & jax.lax.stop_gradient(increment > -jnp.inf)
    ess, mean, variance = per_series(
        _summary, num_batch, log_weights, particles, out_axes=(0, 0, 0)
    )
    info = FilterInfo(increment, ess, mean, variance, ancestors, resampled)
    return FilterState(particles, log_weights, alive), info


def _summary(log_weights: Array, particles: Array) -> tuple[Array, Array, Array]:
    """ESS, weighted mean and variance of one series."""
    mean, variance = weighted_moments(log_weights, particles.astype(log_weights.dtype))
    return effective_sample_size(log_weights), mean, variance


def _resample(key, log_weights, particles, resampler, ess_threshold, constrain):
    """Resample every series (unless `ess_threshold` is 0): particles, weights, ancestors, flag."""
    num_batch = log_weights.ndim - 1
    if ess_threshold <= 0.0:
        return particles, log_weights, None, jnp.zeros(log_weights.shape[1:], bool)
    new_particles, new_log_weights, ancestors, resampled = per_series(
        lambda series_key, weights, cloud: _resample_series(
            resampler, ess_threshold, series_key, weights, cloud
        ),
        num_batch,
        log_weights,
        particles,
        key=key,
        out_axes=(1, 1, 1, 0),
    )
    particles = constrain(new_particles).astype(particles.dtype)
    new_log_weights = per_series(
        log_normalize, num_batch, constrain(new_log_weights), out_axes=(1, 0)
    )[0]
    return particles, new_log_weights.astype(log_weights.dtype), ancestors, resampled


def _resample_series(resampler, ess_threshold, key, log_weights, particles):
    """One series: resample when its ESS < `ess_threshold * N` (always when it is 1)."""
    with_ancestors = getattr(resampler, "resample_with_ancestors", None)

    def resample(key, log_weights, particles):
        if with_ancestors is None:
            return (*resampler(key, log_weights, particles), None)
        return with_ancestors(key, log_weights, particles)

    if ess_threshold >= 1.0:
        return (*resample(key, log_weights, particles), jnp.asarray(True))
    num_particles = particles.shape[0]

    def cast(key, log_weights, particles):
        new_particles, new_log_weights, ancestors = resample(key, log_weights, particles)
        return (
            new_particles.astype(particles.dtype),
            new_log_weights.astype(log_weights.dtype),
            ancestors,
        )

    def keep(key, log_weights, particles):
        ancestors = None
        if with_ancestors is not None:
            drawn = jax.eval_shape(with_ancestors, key, log_weights, particles)[2]
            ancestors = jnp.arange(num_particles, dtype=drawn.dtype)
        return particles, log_weights, ancestors

    normalized, _ = log_normalize(log_weights)
    trigger = effective_sample_size(normalized) < ess_threshold * num_particles
    return (*jax.lax.cond(trigger, cast, keep, key, log_weights, particles), trigger)


def _identity(array: Array) -> Array:
    return array


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
    options = check_run_options(num_particles, ess_threshold, checkpoint, resampler, batch_shape)
    kernel, observations, options = check_kernel(
        model, observations, options, particle_sharding, series_sharding, dtype
    )
    return run_filter(key, kernel, observations, **options).result


class FilterRun(NamedTuple):
    """What `run_filter` returns: the result, the final cloud and (optionally) the history."""

    result: FilterResult
    state: FilterState
    history: FilterHistory | None


def run_filter(
    key: PRNGKey,
    model: ParticleModel,
    observations: Array,
    *,
    num_particles: int,
    resampler: Resampler | None = None,
    ess_threshold: float = 1.0,
    constrain: Constrain | None = None,
    batch_shape: tuple[int, ...] = (),
    checkpoint: bool | None = None,
    store_history: bool = False,
    covariates: Any = None,
) -> FilterRun:
    """`init` at $t = 0$, then the scan of `step` over $t = 1..T-1$, for any `ParticleModel`.

    The one forward loop of the package: `particle_filter`, the smoother and the forecast
    run on it. Arguments are checked by the callers. A $-\\infty$ estimate (per series) has
    gradient zero.

    Args:
        key: PRNG key, or a `FilterNoise` of standard normals holding every random number
            of the run (the model must then draw from noise, e.g.
            `state_space_kernel(ssm, noise_driven=True)`, and the resampler take noise).
        model: a `ParticleModel`; it receives `StepInputs(time, observation, missing,
            covariates)`.
        observations: `(*B, T, *observation_shape)`; a time step of a series containing NaN
            is missing.
        num_particles: $N$.
        resampler: default `resampling.diffusion()` (see `step`).
        ess_threshold: see `step`; 0.0 never resamples.
        constrain: optional function applied to arrays with a leading particle axis.
        batch_shape: the series shape $B$, `()` for one series.
        checkpoint: see `particle_filter`; None decides by size (`CHECKPOINT_SIZE`).
        store_history: also return every cloud, its log-weights and the ancestors.
        covariates: optional pytree of per-step inputs passed to the model untouched, each
            leaf `(*B, T, ...)` like `observations`: step $t$ receives its rows $t$ as
            `inputs.covariates` (None when not given).

    Returns:
        `FilterRun(result, state, history)`: the series-first `FilterResult`, the final
        `FilterState` and the `FilterHistory` (None unless `store_history`).
    """
    inputs = _step_inputs(observations, tuple(batch_shape), covariates)
    num_steps = inputs.time.shape[0]
    if isinstance(key, FilterNoise):
        initial_key, keys = key.initial, StepNoise(key.transition, key.resampling)
    else:
        initial_key, steps_key = jax.random.split(key)
        keys = jax.random.split(steps_key, max(num_steps - 1, 0))
    state, first = init(
        initial_key,
        model,
        jax.tree.map(lambda values: values[0], inputs),
        num_particles=num_particles,
    )
    if checkpoint is None:
        checkpoint = state.particles.size * num_steps > CHECKPOINT_SIZE
    body = _scan_body(model, resampler, ess_threshold, constrain, store_history)
    rest_inputs = jax.tree.map(lambda values: values[1:], inputs)
    final, (rest, stored) = jax.lax.scan(
        jax.checkpoint(body) if checkpoint else body, state, (keys, rest_inputs)
    )
    history = None
    if store_history:
        history = FilterHistory(
            jnp.concatenate([state.particles[None], stored[0]]),
            jnp.concatenate([state.log_weights[None], stored[1]]),
            rest.ancestors,
        )
    return FilterRun(_result(first, rest, len(tuple(batch_shape))), final, history)


def _scan_body(model, resampler, ess_threshold, constrain, store_history):
    """The scanned function of `run_filter`: one `step`, and what the scan stacks of it."""

    def body(state, scanned):
        step_key, step_inputs = scanned
        state, info = step(
            step_key,
            state,
            step_inputs,
            model=model,
            resampler=resampler,
            ess_threshold=ess_threshold,
            constrain=constrain,
        )
        if not store_history:
            return state, (info._replace(ancestors=None), None)
        return state, (info, (state.particles, state.log_weights))

    return body


def _result(first: FilterInfo, rest: FilterInfo, num_batch: int) -> FilterResult:
    """Stack the infos of `init` and the steps into a series-first `FilterResult`."""
    increments, ess, mean, variance = (
        jnp.concatenate([jnp.expand_dims(a, 0), b], axis=0)
        for a, b in zip(first[:4], rest[:4], strict=True)
    )
    # A -inf estimate has gradient zero (NUTS then rejects the point cleanly), rather than the
    # finite but meaningless gradient of the terms around the impossible step.
    possible = jax.lax.stop_gradient(jnp.all(increments > -jnp.inf, axis=0))
    increments = jnp.where(possible, increments, jax.lax.stop_gradient(increments))
    increments, ess, mean, variance = (
        jnp.moveaxis(a, 0, num_batch) for a in (increments, ess, mean, variance)
    )
    return FilterResult(jnp.sum(increments, axis=-1), increments, ess, mean, variance)


def _step_inputs(observations: Array, batch_shape: tuple[int, ...], covariates) -> StepInputs:
    """Time-first `StepInputs` of every step: times `(T,)`, observations `(T, *B, *event)`.

    A missing row is filled with a valid row of its own series, so that one series' NaN
    padding never touches another's observations. Covariate leaves `(*B, T, ...)` become
    `(T, *B, ...)`.
    """
    num_batch = len(batch_shape)
    num_steps = observations.shape[num_batch]
    event_shape = observations.shape[num_batch + 1 :]
    flat = observations.reshape((-1, num_steps) + event_shape)
    missing, filled = jax.vmap(fill_missing)(flat)
    missing = jnp.moveaxis(missing, 1, 0).reshape((num_steps,) + batch_shape)
    filled = jnp.moveaxis(filled, 1, 0).reshape((num_steps,) + batch_shape + event_shape)
    if covariates is not None:
        covariates = jax.tree.map(lambda a: jnp.moveaxis(jnp.asarray(a), num_batch, 0), covariates)
    return StepInputs(jnp.arange(num_steps, dtype=jnp.int32), filled, missing, covariates)
