"""Latent states after the fit: particle smoothing and forecasts.

Both run on the filter blocks (`init`, `step`) with index resampling: no gradient is needed
through a smoothed draw or a forecast, and index resampling keeps the ancestry that genealogy
tracing follows.

* `particle_smoother` draws whole paths $x_{0:T-1} \\sim p(x_{0:T-1} \\mid y_{0:T-1})$.
  The forward filter stores every cloud $x_t^i$ and its normalised log-weights $l_t^i$ (after
  observing $y_t$). `method="backward"` is forward-filtering backward-simulation (FFBSi,
  Godsill, Doucet & West 2004): draw $x_{T-1}$ from the final weights, then for
  $t = T-2, \\dots, 0$ draw $x_t = x_t^i$ with probability
  $\\propto \\exp(l_t^i + \\log f(x_{t+1} \\mid x_t^i, t+1))$. `method="genealogy"` follows the
  ancestor indices of the drawn final particles back to $t = 0$ (Kitagawa 1996): cheap, but for
  long series all paths share a few early ancestors (path degeneracy).
* `forecast` draws $x_{T-1}$ from the final filtering distribution, propagates it $H$ steps
  through the transition and emits: draws from $p(x_{T:T+H-1}, y_{T:T+H-1} \\mid y_{0:T-1})$.

A guided proposal changes only how the forward filter moves its particles; the smoothing weights
use the transition density $f$, as they must. Missing observations (NaN rows) are handled by the
forward filter. Parameters that make the model impossible (NaN, a negative scale) give the filter
weight zero everywhere; the draws are then NaN (for floating-point states; the smallest integer of
their dtype for integer states) rather than an error deep inside a traced program.
"""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from numpyro_diffres._log_density import guard
from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_count, particle_dtype
from numpyro_diffres.filtering import run_filter, state_space_kernel
from numpyro_diffres.resampling import systematic
from numpyro_diffres.ssm import StateSpaceModel

__all__ = ["SMOOTHING_METHODS", "draw_paths", "forecast", "particle_smoother"]

SMOOTHING_METHODS = ("backward", "genealogy")


def particle_smoother(
    key: PRNGKey,
    model: StateSpaceModel,
    observations: Array,
    *,
    num_particles: int,
    num_paths: int,
    method: str = "backward",
    resampler=None,
    dtype: DTypeLike | None = None,
) -> Array:
    """Draw latent paths from the smoothing distribution $p(x_{0:T-1} \\mid y_{0:T-1})$.

    A forward particle filter (index resampling at every step) stores all $T$ clouds, so memory
    is $O(T N d)$ for $d$ numbers per state (plus $O(T N)$ integers), whatever the method.
    `method="backward"` (FFBSi) then costs $O(T N M)$ transition-density evaluations for
    $M$ = `num_paths` and is consistent as $N \\to \\infty$ at every time step;
    `method="genealogy"` costs $O(T M)$ but its paths collapse onto few distinct early states
    when $T$ is long compared with $N$ (use it for short series or filtering-like summaries).

    Args:
        key: PRNG key.
        model: the state-space model (bootstrap, or guided with `proposal`).
        observations: `(T, *observation_shape)`; a time step containing NaN is missing.
        num_particles: $N \\ge 2$ particles of the forward filter.
        num_paths: $M \\ge 1$ paths to draw. Given the forward filter they are independent
            draws (FFBSi), so their spread includes the smoothing variance but the filter's own
            noise is shared: for Monte Carlo error bars use independent keys.
        method: `"backward"` (FFBSi, default) or `"genealogy"`.
        resampler: index resampler of the forward filter (it must have an `indices` method,
            e.g. `resampling.systematic()`, the default, or `multinomial()`, `stratified()`).
        dtype: optional floating dtype the drawn states are rounded to (see `particle_filter`).

    Returns:
        Paths of shape `(num_paths, T, *state_shape)`, in the states' dtype. All NaN (or the
        smallest integer of an integer dtype) when the parameters make the observations
        impossible, e.g. a NaN or negative scale.

    Raises:
        TypeError: `model` is not a `StateSpaceModel`, a count is not an int, `resampler` has no
            `indices` method, or `dtype` is not floating.
        ValueError: a count below its minimum, an unknown `method`, observations that do not
            fit the emission, or a `dtype` for integer states.
    """
    num_paths = check_count("num_paths", num_paths, minimum=1)
    if method not in SMOOTHING_METHODS:
        raise ValueError(f"method must be one of {SMOOTHING_METHODS}, got {method!r}.")
    kernel, observations, resampler, num_particles = _prepare(
        model, observations, num_particles, resampler, dtype
    )

    def log_transition(x, x_next, t):
        return _log_transition(model.transition(x, t + 1), x_next)

    return draw_paths(
        key,
        kernel,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        num_paths=num_paths,
        log_transition=log_transition,
        method=method,
    )


def draw_paths(
    key: PRNGKey,
    kernel,
    observations: Array,
    *,
    num_particles: int,
    resampler,
    num_paths: int,
    log_transition,
    method: str,
    covariates=None,
) -> Array:
    """Filter with the history stored, then draw `num_paths` smoothed paths from it.

    The one smoothing routine of `particle_smoother` and `marginalize`'s latent paths:
    `method` `"backward"` (backward simulation with `log_transition(x, x_next, t)`) or
    `"genealogy"`. Returns `(num_paths, T, ...)`, NaN where no path was possible.
    """
    forward_key, draw_key, backward_key = jax.random.split(key, 3)
    final, history = run_filter(
        forward_key,
        kernel,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        covariates=covariates,
        store_history=True,
    )[1:]
    last = jax.random.categorical(draw_key, final.log_weights, shape=(num_paths,))
    if method == "backward":
        paths, possible = backward_simulation(backward_key, log_transition, history, last)
    else:
        paths, possible = trace_genealogy(history, last)
    return mark_impossible(paths, possible & final.alive)


def forecast(
    key: PRNGKey,
    model: StateSpaceModel,
    observations: Array,
    num_steps_ahead: int,
    *,
    num_particles: int,
    num_paths: int,
    resampler=None,
    dtype: DTypeLike | None = None,
) -> tuple[Array, Array]:
    """Draw future states and observations given the data, $p(x_{T:T+H-1}, y_{T:T+H-1} \\mid y)$.

    Filters the observations, draws `num_paths` states from the final weighted cloud, moves
    each through the transition at times $T, \\dots, T+H-1$ and emits. Memory $O(N d)$: no
    history is kept.

    Args:
        key: PRNG key.
        model: the state-space model.
        observations: `(T, *observation_shape)`; NaN rows are missing.
        num_steps_ahead: $H \\ge 1$, the forecast horizon.
        num_particles: $N \\ge 2$ particles of the filter.
        num_paths: $M \\ge 1$ forecast paths.
        resampler: index resampler of the filter (default `resampling.systematic()`).
        dtype: optional floating dtype of the states.

    Returns:
        `(states, observations)` of shapes `(num_paths, H, *state_shape)` and
        `(num_paths, H, *observation_shape)`; NaN (or the smallest integer) where the
        parameters are impossible.

    Raises:
        TypeError: as `particle_smoother`, or a horizon that is not an int.
        ValueError: as `particle_smoother`, or `num_steps_ahead` below 1.
    """
    num_steps_ahead = check_count("num_steps_ahead", num_steps_ahead, minimum=1)
    num_paths = check_count("num_paths", num_paths, minimum=1)
    kernel, observations, resampler, num_particles = _prepare(
        model, observations, num_particles, resampler, dtype
    )
    forward_key, draw_key, ahead_key = jax.random.split(key, 3)
    final = run_filter(
        forward_key, kernel, observations, num_particles=num_particles, resampler=resampler
    ).state
    last = jax.random.categorical(draw_key, final.log_weights, shape=(num_paths,))
    start = final.particles[last]
    num_steps = observations.shape[0]
    cast = _caster(None if dtype is None else particle_dtype(dtype))

    def ahead(state, inputs):
        step_key, t = inputs
        transition_key, emission_key = jax.random.split(step_key)
        transition, transition_valid = guard(model.transition(state, t))
        new = cast(transition.sample(transition_key))
        emission, emission_valid = guard(model.emission(new, t))
        observation = emission.sample(emission_key)
        new = mark_impossible(new, transition_valid)
        return new, (new, mark_impossible(observation, transition_valid & emission_valid))

    def one_path(path_key, state):
        keys = jax.random.split(path_key, num_steps_ahead)
        times = jnp.arange(num_steps, num_steps + num_steps_ahead, dtype=jnp.int32)
        _, (states, emitted) = jax.lax.scan(ahead, state, (keys, times))
        return states, emitted

    states, emitted = jax.vmap(one_path)(jax.random.split(ahead_key, num_paths), start)
    return mark_impossible(states, final.alive), mark_impossible(emitted, final.alive)


def _prepare(model, observations, num_particles, resampler, dtype):
    """Check the shared arguments; return the kernel, observations, resampler and N."""
    if not isinstance(model, StateSpaceModel):
        raise TypeError(
            "model must be a numpyro_diffres.StateSpaceModel (smoothing needs its transition "
            f"density), got {type(model).__name__}."
        )
    num_particles = check_count("num_particles", num_particles, minimum=2)
    resampler = systematic() if resampler is None else resampler
    if not callable(getattr(resampler, "indices", None)):
        raise TypeError(
            "resampler must be an index resampler with an indices(key, log_weights, n) method, "
            f"e.g. numpyro_diffres.resampling.systematic(); got {resampler!r}. Smoothing needs "
            "ancestor indices and no gradient, so differentiable resamplers do not apply."
        )
    if dtype is not None:
        dtype = particle_dtype(dtype)
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
    return state_space_kernel(model, dtype=dtype), observations, resampler, num_particles


def backward_simulation(key, log_transition, history, last):
    """FFBSi: paths `(M, T, ...)` and whether every backward draw had a possible ancestor.

    `log_transition(x_t, x_next, t)` is $\\log f(x_{t+1} \\mid x_t)$ for one pair of particles
    ($-\\infty$ where impossible); `history` is a `FilterHistory` of one series and `last`
    indexes the final cloud.
    """
    end = history.particles[-1][last]

    def body(following, inputs):
        step_key, t, particles, log_weights = inputs

        def logits(x_next):
            return log_weights + jax.vmap(lambda x: log_transition(x, x_next, t))(particles)

        table = jax.vmap(logits)(following)
        chosen = jax.random.categorical(step_key, table, axis=-1)
        possible = jnp.any(table > -jnp.inf, axis=-1)
        current = particles[chosen]
        return current, (current, possible)

    num_steps = history.particles.shape[0]
    keys = jax.random.split(key, max(num_steps - 1, 0))
    times = jnp.arange(num_steps - 1, dtype=jnp.int32)
    _, (states, possible) = jax.lax.scan(
        body,
        end,
        (keys, times, history.particles[:-1], history.log_weights[:-1]),
        reverse=True,
    )
    paths = jnp.concatenate([states, end[None]], axis=0)
    return jnp.moveaxis(paths, 0, 1), jnp.all(possible, axis=0)


def _log_transition(transition, value):
    """`safe_log_prob`'s value without its gradient machinery: $-\\infty$ where impossible.

    Nothing is differentiated here, and the backward pass evaluates $N M$ densities per step:
    the custom derivative rule of `safe_log_prob` would only add work.
    """
    safe, valid = guard(transition)
    log_prob = safe.log_prob(value)
    return jnp.where(valid & jnp.isfinite(log_prob), log_prob, -jnp.inf)


def trace_genealogy(history, last):
    """Follow ancestor indices back from the drawn final particles: paths `(M, T, ...)`."""

    def body(index, inputs):
        particles, ancestors = inputs
        parent = ancestors[index]
        return parent, particles[parent]

    end = history.particles[-1][last]
    _, states = jax.lax.scan(body, last, (history.particles[:-1], history.ancestors), reverse=True)
    paths = jnp.concatenate([states, end[None]], axis=0)
    return jnp.moveaxis(paths, 0, 1), jnp.ones(last.shape, bool)


def mark_impossible(values: Array, possible: Array) -> Array:
    """`values` where `possible` (broadcast from the leading axes), else NaN / the min int."""
    possible = jnp.asarray(possible)
    possible = possible.reshape(possible.shape + (1,) * (values.ndim - possible.ndim))
    if jnp.issubdtype(values.dtype, jnp.inexact):
        fill = jnp.nan
    elif jnp.issubdtype(values.dtype, jnp.integer):
        fill = jnp.iinfo(values.dtype).min
    else:
        return values
    return jnp.where(possible, values, jnp.asarray(fill, values.dtype))


def _caster(dtype):
    if dtype is None:
        return lambda x: x
    return lambda x: x.astype(dtype)
