"""The `ParticleModel` of a `StateSpaceModel`: bootstrap or guided moves of one particle.

One code path serves one series and many: a particle has shape `(*B, *state_shape)` with
$B$ the series shape, `()` for one series, and every density is evaluated per series.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.typing import DTypeLike
from numpyro.distributions import constraints

from numpyro_diffres._log_density import guard, safe_log_prob
from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.noise_draws import draw_from_noise
from numpyro_diffres.ssm import StateSpaceModel

__all__ = ["series_log_prob", "state_space_kernel"]

Constrain = Callable[[Array], Array]


class _StateSpaceKernel(NamedTuple):
    model: StateSpaceModel
    dtype: jnp.dtype | None
    constrain: Constrain
    batch_shape: tuple[int, ...] = ()
    noise_driven: bool = False

    def initialize(self, key, num_particles, inputs):
        initial, initial_valid = guard(self.model.initial)
        if tuple(initial.batch_shape) != self.batch_shape:
            # A prior shared by all series (batch_shape ()) gives each series its own draw.
            initial = initial.expand(self.batch_shape)
        if self.noise_driven:
            drawn = jax.vmap(lambda noise: draw_from_noise(initial, noise))(key)
        else:
            drawn = initial.sample(key, (num_particles,))
        particles = self.constrain(_cast(drawn, self.dtype))
        num_batch = len(self.batch_shape)
        log_likelihood = jax.vmap(
            lambda x: series_log_prob(
                self.model.emission(x, inputs.time), inputs.observation, num_batch
            )
        )(particles)
        log_weights = jnp.where(inputs.missing, 0.0, log_likelihood)
        return particles, jnp.where(initial_valid, log_weights, -jnp.inf)

    def propagate(self, key, particle, inputs):
        num_batch = len(self.batch_shape)
        draw = draw_from_noise if self.noise_driven else _draw_from_key
        new, log_correction = _move(self.model, key, particle, inputs, self.dtype, num_batch, draw)
        log_likelihood = series_log_prob(
            self.model.emission(new, inputs.time), inputs.observation, num_batch
        )
        return new, log_correction, jnp.where(inputs.missing, 0.0, log_likelihood)


def state_space_kernel(
    model: StateSpaceModel,
    *,
    dtype: DTypeLike | None = None,
    constrain: Constrain | None = None,
    batch_shape: tuple[int, ...] = (),
    noise_driven: bool = False,
):
    """The `ParticleModel` of a `StateSpaceModel` (bootstrap, or guided with `proposal`).

    Args:
        model: the state-space model.
        dtype: optional floating dtype the drawn states are rounded to.
        constrain: optional function applied to arrays with a leading particle axis (e.g. a
            sharding constraint).
        batch_shape: the series shape $B$ of a model for many series (distributions with
            `batch_shape` $B$, see `StateSpaceModel.check`); `()` for one series.
        noise_driven: draw from standard-normal noise (`noise_draws.draw_from_noise`) in
            place of PRNG keys, for a filter run on a `FilterNoise`.

    Returns:
        An object with `initialize` and `propagate` (see `filtering.ParticleModel`).
    """
    return _StateSpaceKernel(
        model,
        dtype,
        _identity if constrain is None else constrain,
        tuple(batch_shape),
        noise_driven,
    )


def series_log_prob(distribution, value: Array, num_batch: int) -> Array:
    """`safe_log_prob` per series: shape $B$, $-\\infty$ with a finite gradient where impossible.

    With no series axes this is `safe_log_prob` itself. With series, an impossible value in
    one series (outside the support, a non-finite density) is evaluated again at a feasible
    point of that series only, so the other series keep their densities and gradients
    (`safe_log_prob`'s derivative rule is for a scalar density). Invalid parameters make every
    series impossible (the joint density is zero anyway).
    """
    if num_batch == 0:
        return safe_log_prob(distribution, value)
    safe, valid = guard(distribution)
    log_prob = safe.log_prob(value)
    possible = jax.lax.stop_gradient(
        valid & _series_in_support(safe, value, log_prob.shape) & jnp.isfinite(log_prob)
    )
    mask = possible.reshape(possible.shape + (1,) * len(safe.event_shape))
    point = jnp.where(mask, value, safe.support.feasible_like(value))
    # The parameters of an impossible series (e.g. an overflowing location) are replaced too:
    # their derivatives at the discarded point can be infinite, and `where` would turn them
    # into NaN (0 * inf).
    return jnp.where(possible, _feasible_series(safe, possible).log_prob(point), -jnp.inf)


def _feasible_series(distribution, possible: Array):
    """`distribution` with every checked parameter feasible in the series where not `possible`.

    The series axes lead the batch shape. A distribution that cannot be rebuilt from its
    parameters is returned unchanged.
    """
    base = distribution
    while isinstance(base, dist.Independent):
        base = base.base_dist
    parameters = {}
    for name, constraint in base.arg_constraints.items():
        if name not in base.__dict__:
            continue
        value = parameters[name] = base.__dict__[name]
        if value is None or constraints.is_dependent(constraint):
            continue
        event_shape = jnp.shape(value)[jnp.ndim(value) - constraint.event_dim :]
        value = jnp.broadcast_to(value, base.batch_shape + event_shape)
        keep = possible.reshape(possible.shape + (1,) * (value.ndim - possible.ndim))
        parameters[name] = jnp.where(keep, value, constraint.feasible_like(value))
    try:
        with numpyro.validation_enabled(False):
            rebuilt = type(base)(**parameters)
    except (TypeError, ValueError, NotImplementedError):
        return distribution
    if rebuilt.batch_shape != base.batch_shape:
        return distribution
    return rebuilt.to_event(len(distribution.event_shape) - len(base.event_shape))


def _series_in_support(distribution, value: Array, batch_shape: tuple[int, ...]) -> Array:
    """Per series: whether `value` lies in the support (True where it cannot be checked)."""
    support = distribution.support
    if constraints.is_dependent(support):
        return jnp.ones(batch_shape, bool)
    try:
        inside = jnp.asarray(support(value))
    except NotImplementedError:
        return jnp.ones(batch_shape, bool)
    inside = jnp.broadcast_to(inside, batch_shape + inside.shape[len(batch_shape) :])
    return jnp.all(inside.reshape(batch_shape + (-1,)), axis=-1)


def _move(
    model: StateSpaceModel,
    key: PRNGKey,
    x: Array,
    inputs,
    dtype: jnp.dtype | None,
    num_batch: int,
    draw: Callable,
) -> tuple[Array, Array]:
    """Draw $x_t$ for one particle `(*B, *state_shape)`: `(new, log f - log q)` per series.

    `draw(distribution, key)` makes the draw: from a PRNG key, or from the particle's noise.
    """
    time, observation = inputs.time, inputs.observation
    transition, transition_valid = guard(model.transition(x, time))
    batch_shape = x.shape[:num_batch]
    if model.proposal is None:
        new = _cast(draw(transition, key), dtype)
        correction = jnp.zeros(batch_shape, _weight_dtype(new))
    else:
        proposal, proposal_valid = guard(model.proposal(x, time, observation))
        # A missing y_t has nothing to guide the proposal (it would see the filler value):
        # such a series moves by the transition, with no weight correction.
        missing = jnp.broadcast_to(inputs.missing, batch_shape)
        new = jnp.where(
            missing.reshape(batch_shape + (1,) * (x.ndim - num_batch)),
            _cast(draw(transition, key), dtype),
            _cast(draw(proposal, key), dtype),
        )
        correction = series_log_prob(transition, new, num_batch) - series_log_prob(
            proposal, new, num_batch
        )
        correction = jnp.where(proposal_valid, correction, -jnp.inf)
        correction = jnp.where(missing, 0.0, correction)
    correction = jnp.where(transition_valid, correction, -jnp.inf)
    if jnp.issubdtype(new.dtype, jnp.floating):
        # Sanitise so a non-finite state (invalid parameters) cannot leak NaN downstream.
        finite = jnp.all(jnp.isfinite(new), axis=tuple(range(num_batch, new.ndim)))
        new = jnp.where(
            finite.reshape(finite.shape + (1,) * (new.ndim - num_batch)), new, jnp.zeros_like(new)
        )
        correction = jnp.where(finite, correction, -jnp.inf)
    return new, correction


def _draw_from_key(distribution, key: PRNGKey) -> Array:
    return distribution.sample(key)


def _identity(array: Array) -> Array:
    return array


def _cast(x: Array, dtype: jnp.dtype | None) -> Array:
    return x if dtype is None else x.astype(dtype)


def _weight_dtype(x: Array) -> jnp.dtype:
    """The dtype of a log-weight for state `x`: its own if floating, else JAX's default float."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
