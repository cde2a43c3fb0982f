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
"""

import math
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


class FilterState(NamedTuple):
    """The weighted particle cloud between two steps.

    Attributes:
        particles: shape `(N, *state_shape)`.
        log_weights: normalised log-weights, shape `(N,)`.
        alive: scalar bool, False once every particle has had weight zero at some step (the
            estimate is then $-\\infty$ whatever follows).
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

    def initialize(self, key, num_particles, observation, missing):
        initial, initial_valid = guard(self.model.initial)
        particles = self.constrain(_cast(initial.sample(key, (num_particles,)), self.dtype))
        log_likelihood = jax.vmap(
            lambda x: safe_log_prob(self.model.emission(x, jnp.int32(0)), observation)
        )(particles)
        log_weights = jnp.where(missing, 0.0, log_likelihood)
        log_weights = jnp.where(initial_valid, log_weights - math.log(num_particles), -jnp.inf)
        return particles, log_weights

    def propagate(self, key, particle, time, observation, missing):
        new, log_correction = _move(self.model, key, particle, time, observation, self.dtype)
        log_likelihood = safe_log_prob(self.model.emission(new, time), observation)
        return new, log_correction, jnp.where(missing, 0.0, log_likelihood)


def state_space_kernel(
    model: StateSpaceModel,
    *,
    dtype: DTypeLike | None = None,
    constrain: Constrain | None = None,
) -> ParticleModel:
    """The `ParticleModel` of a `StateSpaceModel` (bootstrap, or guided with `proposal`).

    Args:
        model: the state-space model.
        dtype: optional floating dtype the drawn states are rounded to.
        constrain: optional function applied to arrays with a leading particle axis (e.g. a
            sharding constraint).

    Returns:
        An object with `initialize` and `propagate`.
    """
    return _StateSpaceKernel(model, dtype, _identity if constrain is None else constrain)


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
        observation: $y_0$ (any value of the right shape when `missing`).
        num_particles: $N$.
        missing: whether $y_0$ is missing.

    Returns:
        `(state, info)`.
    """
    particles, log_weights = model.initialize(key, num_particles, observation, missing)
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
    particles, log_weights, alive = state
    resample_key, move_key = jax.random.split(key)
    # Once every particle has had weight zero the estimate is -inf whatever follows; the
    # cloud (often overflowing, e.g. an explosive transition) is replaced by a harmless
    # placeholder so that no resampler or density sees it: its NaN derivatives would
    # otherwise reach the parameters through the discarded branches (0 * inf).
    particles = jnp.where(alive, particles, jnp.zeros_like(particles))
    if resampler is not None:
        new_particles, new_log_weights = resampler(resample_key, log_weights, particles)
        particles = constrain(new_particles).astype(particles.dtype)
        log_weights = log_normalize(constrain(new_log_weights))[0].astype(log_weights.dtype)
    move_keys = jax.random.split(move_key, particles.shape[0])
    new_particles, log_correction, log_likelihood = jax.vmap(
        lambda k, x: model.propagate(k, x, time, observation, missing)
    )(move_keys, particles)
    new_particles = constrain(new_particles)
    log_weights, increment = log_normalize(log_weights + log_correction + log_likelihood)
    alive = alive & jax.lax.stop_gradient(increment > -jnp.inf)
    return FilterState(new_particles, log_weights, alive), _info(
        increment, log_weights, new_particles
    )


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
    num_particles = check_count("num_particles", num_particles, minimum=2)
    ess_threshold = check_fraction("ess_threshold", ess_threshold)
    if particle_sharding is not None and not isinstance(particle_sharding, jax.sharding.Sharding):
        raise TypeError(
            "particle_sharding must be a jax.sharding.Sharding (e.g. a NamedSharding over the "
            f"particle axis) or None; got {particle_sharding!r}."
        )
    if dtype is not None:
        dtype = particle_dtype(dtype)
    resampler = diffusion() if resampler is None else resampler
    check_callable(
        "resampler",
        resampler,
        "resampler(key, log_weights, particles)",
        "numpyro_diffres.resampling.diffusion()",
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

    constrain = _identity
    if particle_sharding is not None:
        sharding = _auto_sharding(particle_sharding, num_particles)

        def constrain(array):
            return jax.lax.with_sharding_constraint(array, sharding)

    kernel = state_space_kernel(model, dtype=dtype, constrain=constrain)
    resampler = None if ess_threshold <= 0.0 else adaptive(resampler, ess_threshold)
    return run_filter(
        key,
        kernel,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        constrain=constrain,
    )


def run_filter(
    key: PRNGKey,
    model: ParticleModel,
    observations: Array,
    *,
    num_particles: int,
    resampler: Resampler | None,
    constrain: Constrain | None = None,
) -> FilterResult:
    """The scan of `step` over $t = 1..T-1$ after `init`, for any `ParticleModel`.

    Arguments are checked by the callers (`particle_filter` and the NumPyro handlers).
    Each step is rematerialised in the reverse pass (`jax.checkpoint`), so the gradient keeps
    one cloud per time step rather than every intermediate of the resampler. A $-\\infty$
    estimate has gradient zero.

    Returns:
        A `FilterResult`.
    """
    missing, filled = fill_missing(observations)
    initial_key, steps_key = jax.random.split(key)
    state, first = init(
        initial_key, model, filled[0], num_particles=num_particles, missing=missing[0]
    )

    @jax.checkpoint
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

    num_steps = observations.shape[0]
    keys = jax.random.split(steps_key, max(num_steps - 1, 0))
    times = jnp.arange(1, num_steps, dtype=jnp.int32)
    _, rest = jax.lax.scan(body, state, (keys, times, filled[1:], missing[1:]))
    increments, ess, mean, variance = (
        jnp.concatenate([jnp.expand_dims(a, 0), b], axis=0)
        for a, b in zip(first, rest, strict=True)
    )
    # A -inf estimate has gradient zero (NUTS then rejects the point cleanly), rather than the
    # finite but meaningless gradient of the terms around the impossible step.
    possible = jax.lax.stop_gradient(jnp.all(increments > -jnp.inf))
    increments = jnp.where(possible, increments, jax.lax.stop_gradient(increments))
    return FilterResult(jnp.sum(increments), increments, ess, mean, variance)


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


def _identity(array: Array) -> Array:
    return array


def _info(increment: Array, log_weights: Array, particles: Array) -> FilterInfo:
    values = particles.astype(log_weights.dtype)
    mean, variance = weighted_moments(log_weights, values)
    return FilterInfo(increment, effective_sample_size(log_weights), mean, variance)


def _move(
    model: StateSpaceModel, key: PRNGKey, x: Array, t: Array, y: Array, dtype: jnp.dtype | None
) -> tuple[Array, Array]:
    transition, transition_valid = guard(model.transition(x, t))
    if model.proposal is None:
        new = _cast(transition.sample(key), dtype)
        correction = jnp.zeros((), _weight_dtype(new))
    else:
        proposal, proposal_valid = guard(model.proposal(x, t, y))
        new = _cast(proposal.sample(key), dtype)
        correction = safe_log_prob(transition, new) - safe_log_prob(proposal, new)
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


def _weight_dtype(x: Array) -> jnp.dtype:
    """The dtype of a log-weight for state `x`: its own if floating, else JAX's default float."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
