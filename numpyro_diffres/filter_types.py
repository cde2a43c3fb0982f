"""The shapes the filter blocks share: step inputs, states, infos and the model protocol.

Every array carries the series shape $B$ after the particle axis: `()` for one series.
"""

import math
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from numpyro_diffres._typing import Array, PRNGKey

__all__ = [
    "FilterHistory",
    "FilterNoise",
    "FilterInfo",
    "FilterState",
    "ParticleModel",
    "StepInputs",
    "StepNoise",
    "align",
    "per_series",
]


class StepInputs(NamedTuple):
    """What one time step gives the model; the filter passes it through untouched.

    Attributes:
        time: $t$, an int32 scalar.
        observation: $y_t$, `(*B, *observation_shape)` (any valid value where missing).
        missing: bool, shape $B$: whether $y_t$ is missing (it then weighs nothing).
        covariates: anything else the model reads at time $t$ (a pytree), or None.
    """

    time: Array
    observation: Array
    missing: Array
    covariates: Any = None


class StepNoise(NamedTuple):
    """One step's randomness as standard normals, in place of its PRNG key.

    Attributes:
        move: each particle's move noise, `(N, *B, *state_shape)`.
        resampling: the resampler's noise, `(*B, *noise_shape)`: series first, then the
            resampler's `noise_shape(N, state_shape)` (`()` for sorted systematic: one
            standard normal per series; `(N, d)` for diffusion's ODE).
    """

    move: Array
    resampling: Array


class FilterNoise(NamedTuple):
    """Every random number of one filter run as standard normals, in place of its key.

    Attributes:
        initial: the first cloud's noise, `(N, *B, *state_shape)`.
        transition: each later step's move noise, `(T - 1, N, *B, *state_shape)`.
        resampling: each later step's resampling noise, `(T - 1, *B, *noise_shape)` (see
            `StepNoise`).
    """

    initial: Array
    transition: Array
    resampling: Array


class FilterState(NamedTuple):
    """The weighted particle cloud between two steps.

    Attributes:
        particles: shape `(N, *B, *state_shape)`.
        log_weights: normalised log-weights `(N, *B)`, each series normalised separately.
        alive: bool, shape $B$: False once every particle has had weight zero at some step
            (the estimate is then $-\\infty$ whatever follows).
    """

    particles: Array
    log_weights: Array
    alive: Array


class FilterInfo(NamedTuple):
    """What one step reports (every field leads with the series shape $B$ where it has one).

    Attributes:
        log_likelihood_increment: $\\log p(y_t \\mid y_{0:t-1})$ estimate, shape $B$.
        ess: effective sample size of the weights after observing $y_t$, shape $B$.
        filtered_mean: weighted mean of $x_t$, shape `(*B, *state_shape)`.
        filtered_variance: weighted per-coordinate variance, shape `(*B, *state_shape)`.
        ancestors: `(N, *B)` int indices of the particle each resampled particle copies, for
            resamplers that report them (index resamplers, through
            `resample_with_ancestors`; `arange(N)` where a series was not resampled); None
            for resamplers that move particles (diffusion, optimal transport, soft, ...),
            for `ess_threshold=0` and for `init`.
        resampled: bool, shape $B$: whether the series was resampled before this move.
    """

    log_likelihood_increment: Array
    ess: Array
    filtered_mean: Array
    filtered_variance: Array
    ancestors: Array | None = None
    resampled: Array | None = None


class FilterHistory(NamedTuple):
    """Every cloud of a run, time first (what smoothing needs).

    Attributes:
        particles: `(T, N, *B, *state_shape)`, the clouds after observing each $y_t$.
        log_weights: `(T, N, *B)`, their normalised log-weights.
        ancestors: `(T - 1, N, *B)` ancestor indices of the resampling before each step
            $t \\ge 1$, or None (see `FilterInfo.ancestors`).
    """

    particles: Array
    log_weights: Array
    ancestors: Array | None


class ParticleModel(Protocol):
    """What the blocks need of a model: draw the first cloud, move one particle.

    `state_space_kernel` builds one from a `StateSpaceModel`; any object with these two
    methods (e.g. one built from a NumPyro program) runs through the same `init` and `step`.
    Both receive the step's `StepInputs` as given to `init` / `step` (or built by
    `run_filter`), untouched. For many series (batch shape $B$) a particle is
    `(*B, *state_shape)` and every log-density has shape $B$; `init` and `step` read $B$ off
    the log-weights.
    """

    def initialize(
        self, key: PRNGKey, num_particles: int, inputs: StepInputs
    ) -> tuple[Array, Array]:
        """First cloud `(N, *B, *state_shape)` and its log-weights `(N, *B)`.

        The log-weights are $\\log g(y_0 \\mid x_0)$ (0 where missing) plus any importance
        correction of the first draw, WITHOUT the $-\\log N$: `init` adds it.
        """
        ...

    def propagate(
        self, key: PRNGKey, particle: Array, inputs: StepInputs
    ) -> tuple[Array, Array, Array]:
        """Move one particle: `(new_particle, log_correction, log_likelihood)`.

        `log_correction` is $\\log f - \\log q$ (0 for a bootstrap move), `log_likelihood`
        is $\\log g(y_t \\mid x_t)$ (0 when missing); either is $-\\infty$ for an impossible
        particle. All randomness of the move comes from `key`.
        """
        ...


def per_series(function, num_batch, *arrays, key=None, out_axes=0):
    """Apply `function`, written for one series (particle axis first), to every series.

    `arrays` have shape `(N, *B, ...)`; each output is reshaped back with $B$ at its
    `out_axes` entry (1 for per-particle arrays, 0 for per-series summaries). One series
    (`num_batch` 0) is the same call with no series axis; `key` is then the series' key,
    else it is split into one key per series, or, when it is standard-normal noise of shape
    `(*B, ...)` (a `StepNoise`'s resampling noise), indexed per series along its leading $B$.
    """
    if num_batch == 0:
        return function(*arrays) if key is None else function(key, *arrays)
    batch_shape = arrays[0].shape[1 : 1 + num_batch]
    size = math.prod(batch_shape)
    flat = [
        array.reshape((array.shape[0], size) + array.shape[1 + num_batch :]) for array in arrays
    ]
    in_axes = (1,) * len(flat)
    if key is not None:
        noise = jnp.issubdtype(jnp.asarray(key).dtype, jnp.floating)
        if noise:
            keys = jnp.reshape(key, (size, *jnp.shape(key)[num_batch:]))
        else:
            keys = jax.random.split(key, size)
        flat, in_axes = [keys, *flat], (0, *in_axes)
    results = jax.vmap(function, in_axes=in_axes, out_axes=out_axes)(*flat)

    def unflatten(axis, result):
        if result is None:
            return None
        return result.reshape(result.shape[:axis] + batch_shape + result.shape[axis + 1 :])

    if isinstance(out_axes, tuple):
        return tuple(
            unflatten(axis, result) for axis, result in zip(out_axes, results, strict=True)
        )
    return unflatten(out_axes, results)


def align(series_values: Array, particles: Array) -> Array:
    """Reshape a per-series array $B$ to broadcast against `(N, *B, *state_shape)`."""
    trailing = particles.ndim - 1 - series_values.ndim
    return series_values.reshape((1,) + series_values.shape + (1,) * trailing)
