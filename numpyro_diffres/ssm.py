"""State-space models written with NumPyro distributions.

$$x_0 \\sim p(x_0), \\quad x_t \\mid x_{t-1} \\sim f(x_t \\mid x_{t-1}, t), \\quad
y_t \\mid x_t \\sim g(y_t \\mid x_t, t), \\qquad t = 0, \\dots, T-1,$$

so the first state emits the first observation (the convention of dynamax, particles, TFP and
pfjax). The transition and emission callables are written for one particle; the library vmaps.
"""

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_count

__all__ = ["StateSpaceModel", "simulate"]

TransitionFn = Callable[[Array, Array], Distribution]
EmissionFn = Callable[[Array, Array], Distribution]
ProposalFn = Callable[[Array, Array, Array], Distribution]


@dataclasses.dataclass(frozen=True)
class StateSpaceModel:
    """A state-space model.

    Attributes:
        initial: distribution of $x_0$ (its `batch_shape + event_shape` is the state shape;
            `batch_shape` must be `()`: use `.to_event(1)` for a vector of independent
            coordinates). For many series (`batch_shape` $B$ given to the filter, e.g.
            inside `numpyro.plate("series", S)`), the batch shape is the series shape $B$
            (or broadcasts to it) and the event shape is one series' state.
        transition: `transition(x, t)` returns the distribution of $x_t$ given
            $x_{t-1} = x$, for one particle; `t` is the integer time index (1..T-1).
        emission: `emission(x, t)` returns the distribution of $y_t$ given $x_t = x$.
        proposal: optional guided proposal `proposal(x_prev, t, y_t)` for $t \\ge 1$; the
            filter then corrects the weights by $\\log f - \\log q$.
    """

    initial: Distribution
    transition: TransitionFn
    emission: EmissionFn
    proposal: ProposalFn | None = None

    def __post_init__(self):
        if not isinstance(self.initial, Distribution):
            raise TypeError(
                "StateSpaceModel(initial=...) must be a numpyro Distribution, got "
                f"{type(self.initial).__name__}."
            )
        for name in ("transition", "emission"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"StateSpaceModel({name}=...) must be callable (x, t) -> Distribution."
                )
        if self.proposal is not None and not callable(self.proposal):
            raise TypeError("StateSpaceModel(proposal=...) must be callable (x_prev, t, y_t).")

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one state, `initial.batch_shape + initial.event_shape`."""
        return tuple(self.initial.batch_shape) + tuple(self.initial.event_shape)

    def check(
        self,
        observation_shape: tuple[int, ...] | None = None,
        *,
        batch_shape: tuple[int, ...] = (),
    ) -> "ModelInfo":
        """Trace the callables once on abstract values and check their shapes.

        Args:
            observation_shape: shape of one observation $y_t$ (of one series), if known.
            batch_shape: the series shape $B$ of a model for many series, `()` for one.
                With $B$, a "particle" is the stack `(*B, *state_shape)` of every series'
                state: `initial` must have `batch_shape` $B$ (or one that broadcasts to it,
                e.g. `()` for a prior shared by all series), `transition(x, t)` and
                `emission(x, t)` must have `batch_shape` exactly $B$, and the event shapes
                are one series' state and observation.

        Returns:
            `ModelInfo` with the state and observation shapes, the state dtype and whether the
            transition can be sampled with a reparameterised (pathwise) gradient.

        Raises:
            ValueError: inconsistent shapes, with what to change.
        """
        if batch_shape:
            return self._check_series(observation_shape, tuple(batch_shape))
        _check_scalar_batch("initial", self.initial)
        state_shape = self.state_shape
        state = jax.ShapeDtypeStruct(state_shape, _sample_dtype(self.initial))
        time = jax.ShapeDtypeStruct((), jnp.int32)
        transition = _probe(self.transition, state, time)
        _check_scalar_batch("transition(x, t)", transition)
        transition_shape = tuple(transition["batch_shape"]) + tuple(transition["event_shape"])
        if transition_shape != state_shape:
            raise ValueError(
                f"transition(x, t) returns a distribution over shape {transition_shape}, but the "
                f"initial state has shape {state_shape}; they must agree."
            )
        emission = _probe(self.emission, state, time)
        _check_scalar_batch("emission(x, t)", emission)
        emission_shape = tuple(emission["batch_shape"]) + tuple(emission["event_shape"])
        return self._info(state, state_shape, emission_shape, observation_shape, transition, ())

    def _check_series(
        self, observation_shape: tuple[int, ...] | None, batch_shape: tuple[int, ...]
    ) -> "ModelInfo":
        initial_batch = tuple(self.initial.batch_shape)
        if len(initial_batch) > len(batch_shape) or any(
            size not in (1, target)
            for size, target in zip(initial_batch[::-1], batch_shape[::-1], strict=False)
        ):
            raise ValueError(
                f"For {_series_words(batch_shape)}, initial must have batch_shape "
                f"{batch_shape} (one entry per series; or () when all series share it) and "
                f"the state of ONE series as its event; got batch_shape {initial_batch} and "
                f"event_shape {tuple(self.initial.event_shape)}. Declare the coordinates of "
                "a series' state as one event (e.g. .to_event(1)) and give parameters one "
                "leading axis per series."
            )
        state_shape = tuple(self.initial.event_shape)
        particle = batch_shape + state_shape
        state = jax.ShapeDtypeStruct(particle, _sample_dtype(self.initial))
        time = jax.ShapeDtypeStruct((), jnp.int32)
        found = {}
        for name in ("transition", "emission"):
            try:
                found[name] = _probe(getattr(self, name), state, time)
            except (ValueError, TypeError, IndexError) as error:
                if isinstance(error, TypeError) and "must return a numpyro" in str(error):
                    raise
                raise ValueError(
                    f"{name}(x, t) failed for a particle of shape {particle} (the states of "
                    f"{_series_words(batch_shape)}, each of shape {state_shape}): {error} "
                    f"Parameters drawn in the series plate have shape {batch_shape}; to combine "
                    f"them with a state of event shape {state_shape}, index them as "
                    f"param[..., {', '.join(['None'] * len(state_shape)) or '...'}]."
                ) from error
            found_shape = tuple(found[name]["batch_shape"])
            if found_shape != batch_shape:
                raise ValueError(
                    f"For {_series_words(batch_shape)}, {name}(x, t) must have batch_shape "
                    f"{batch_shape} (the series) and the event of ONE series; got batch_shape "
                    f"{found_shape} and event_shape {tuple(found[name]['event_shape'])}. "
                    "Check that its parameters have one leading axis per series (or none) "
                    "and declare the coordinates of one series as the event (.to_event)."
                )
        transition_shape = tuple(found["transition"]["event_shape"])
        if transition_shape != state_shape:
            raise ValueError(
                f"transition(x, t) returns a distribution over a series' state of shape "
                f"{transition_shape}, but the initial state of a series has shape "
                f"{state_shape}; they must agree."
            )
        emission_shape = tuple(found["emission"]["event_shape"])
        return self._info(
            state, state_shape, emission_shape, observation_shape, found["transition"], batch_shape
        )

    def _info(self, state, state_shape, emission_shape, observation_shape, transition, batch_shape):
        """Check the observations' shape against the emission's; the `ModelInfo`."""
        if observation_shape is not None and tuple(observation_shape) != emission_shape:
            per, series, leading = (
                ("per-series, per-time", " per series", f"*{batch_shape}, ")
                if batch_shape
                else ("per-time", "", "")
            )
            raise ValueError(
                f"observations have {per} shape {tuple(observation_shape)} but "
                f"emission(x, t) is a distribution over shape {emission_shape}{series}; "
                f"observations must have shape ({leading}T, *{emission_shape})."
            )
        return ModelInfo(
            state_shape=state_shape,
            observation_shape=emission_shape,
            transition_has_rsample=bool(transition["has_rsample"]),
            initial_has_rsample=bool(self.initial.has_rsample),
            state_dtype=state.dtype,
            batch_shape=batch_shape,
        )


def _series_words(batch_shape: tuple[int, ...]) -> str:
    return f"{math.prod(batch_shape)} series (batch_shape {batch_shape})"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Static facts about a `StateSpaceModel`, from `StateSpaceModel.check`."""

    state_shape: tuple[int, ...]
    observation_shape: tuple[int, ...]
    transition_has_rsample: bool
    initial_has_rsample: bool
    state_dtype: Any = None
    batch_shape: tuple[int, ...] = ()


def _sample_dtype(distribution: Distribution) -> Any:
    return jax.eval_shape(lambda k: distribution.sample(k), jax.random.PRNGKey(0)).dtype


def _probe(fn: Callable[..., Distribution], *args: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def traced(*values):
        distribution = fn(*values)
        if not isinstance(distribution, Distribution):
            raise TypeError(
                f"{getattr(fn, '__name__', fn)!s} must return a numpyro Distribution, got "
                f"{type(distribution).__name__}."
            )
        found["batch_shape"] = distribution.batch_shape
        found["event_shape"] = distribution.event_shape
        found["has_rsample"] = distribution.has_rsample
        return jnp.zeros(())

    jax.eval_shape(traced, *args)
    return found


def _check_scalar_batch(name: str, info: Distribution | dict[str, Any]) -> None:
    batch_shape = info["batch_shape"] if isinstance(info, dict) else info.batch_shape
    if len(batch_shape) > 0:
        event_shape = info["event_shape"] if isinstance(info, dict) else info.event_shape
        raise ValueError(
            f"{name} must describe ONE particle with batch_shape (); got batch_shape "
            f"{tuple(batch_shape)} and event_shape {tuple(event_shape)}. Declare the "
            f"coordinates as one event, e.g. dist.Normal(loc, scale).to_event("
            f"{len(batch_shape)})."
        )


def warn_no_rsample(what: str) -> None:
    """Warn that pathwise gradients through `what` are unavailable."""
    warnings.warn(
        f"The {what} distribution has no reparameterised sampler (has_rsample=False): its "
        "samples carry no pathwise gradient, so gradients of the log-likelihood with respect "
        "to parameters that enter it are incomplete. Use a reparameterisable distribution "
        "when you need gradients (SVI, NUTS).",
        stacklevel=3,
    )


def simulate(key: PRNGKey, model: StateSpaceModel, num_steps: int) -> tuple[Array, Array]:
    """Draw a state path and its observations.

    Args:
        key: PRNG key.
        model: the state-space model.
        num_steps: $T$, the number of states and observations.

    Returns:
        `(states, observations)` of shapes `(T, *state_shape)` and `(T, *observation_shape)`.

    Raises:
        TypeError: `num_steps` is not an int.
        ValueError: `num_steps` is below 1.
    """
    num_steps = check_count("num_steps", num_steps, minimum=1)
    model.check()
    initial_key, emission_key, steps_key = jax.random.split(key, 3)
    x0 = model.initial.sample(initial_key)
    y0 = model.emission(x0, jnp.asarray(0, jnp.int32)).sample(emission_key)

    def step(state, inputs):
        step_key, t = inputs
        transition_key, emission_key = jax.random.split(step_key)
        x = model.transition(state, t).sample(transition_key)
        y = model.emission(x, t).sample(emission_key)
        return x, (x, y)

    keys = jax.random.split(steps_key, num_steps - 1)
    times = jnp.arange(1, num_steps, dtype=jnp.int32)
    _, (states, observations) = jax.lax.scan(step, x0, (keys, times))
    states = jnp.concatenate([x0[None], states], axis=0)
    observations = jnp.concatenate([y0[None], observations], axis=0)
    return states, observations
