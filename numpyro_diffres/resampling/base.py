"""The resampler protocol and the input checks every resampler shares."""

import dataclasses
import math
from typing import ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from numpyro_diffres._log_density import log_normalize
from numpyro_diffres._typing import Array, PRNGKey

__all__ = [
    "PreparedInput",
    "Resampler",
    "prepare",
    "standard_draw",
    "uniform_log_weights",
    "whitening_scale",
]


class Resampler(Protocol):
    """A resampler: `(key, log_weights, particles) -> (particles, log_weights)`.

    `particles` has shape `(N, *event_shape)` and `log_weights` shape `(N,)`, unnormalised.
    The output has the same shapes; its log-weights are normalised.

    A resampler also says what kind it is, so that code outside `resampling/` can ask it
    instead of testing its class (wrappers such as `adaptive` and `gradient_decay` report
    their base resampler's traits).
    """

    @property
    def moves_particles(self) -> bool:
        """Whether output particles are new points rather than copies of input particles.

        True for diffusion, optimal-transport and Gumbel-softmax resampling, whose outputs
        are interpolations of the input cloud: an integer or discrete state would be moved
        off its values. False for index resamplers (multinomial, systematic, stratified) and
        for those built on them (stop-gradient, soft), which copy input particles.
        """
        ...

    @property
    def has_ancestors(self) -> bool:
        """Whether every output particle is one input particle picked by an ancestor index.

        True for multinomial, systematic and stratified resampling and for stop-gradient and
        soft resampling, which draw their ancestors with one of those: the particle
        genealogy exists. False for resamplers that move particles.
        """
        ...

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample `particles` according to `log_weights`."""
        ...


class MovesParticles:
    """Traits of a resampler whose outputs are new points (diffusion, OT, Gumbel-softmax)."""

    moves_particles: ClassVar[bool] = True
    has_ancestors: ClassVar[bool] = False


class PicksAncestors:
    """Traits of a resampler whose outputs are input particles picked by index."""

    moves_particles: ClassVar[bool] = False
    has_ancestors: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Wrapper:
    """A resampler around another: it reports the traits of the one it wraps.

    Attributes:
        resampler: the wrapped resampler.
    """

    resampler: Resampler

    @property
    def moves_particles(self) -> bool:
        """The wrapped resampler's `moves_particles`."""
        return self.resampler.moves_particles

    @property
    def has_ancestors(self) -> bool:
        """The wrapped resampler's `has_ancestors`."""
        return self.resampler.has_ancestors

    @property
    def reweights(self) -> bool:
        """The wrapped resampler's `reweights` (False when it does not say)."""
        return getattr(self.resampler, "reweights", False)


class PreparedInput(NamedTuple):
    """Flattened, cleaned resampler input.

    Attributes:
        particles: `(N, d)`, non-finite rows replaced by zeros.
        log_weights: `(N,)`, normalised; non-finite particles get $-\\infty$.
        event_shape: the original event shape, to restore the output.
    """

    particles: Array
    log_weights: Array
    event_shape: tuple[int, ...]


def standard_draw(sampler, key: PRNGKey, shape: tuple[int, ...], dtype) -> Array:
    """`sampler(key, shape)` drawn at JAX's default float precision, rounded to `dtype`.

    With x64 enabled a float32 and a float64 call with the same key then use the same numbers
    (up to rounding), so the two precisions can be compared without Monte Carlo noise. With
    x64 disabled the default precision is float32 and this is the plain float32 draw.
    """
    return sampler(key, shape).astype(dtype)


def prepare(log_weights: Array, particles: Array, *, require_float: bool = True) -> PreparedInput:
    """Check shapes at trace time and normalise the weights.

    Particles with a non-finite coordinate get log-weight $-\\infty$ (they are dropped), so one
    overflowing particle cannot poison the cloud. If no particle has a finite log-weight, the
    weights become uniform over the input: there is nothing to prefer.

    Raises:
        ValueError: fewer than 2 particles, or `log_weights` not of shape `(N,)`.
        TypeError: non-floating particles when `require_float` (interpolating resamplers).
    """
    particles = jnp.asarray(particles)
    log_weights = jnp.asarray(log_weights)
    if particles.ndim < 1:
        raise ValueError("particles must have shape (N, *event_shape); got a scalar.")
    n = particles.shape[0]
    if n < 2:
        raise ValueError(f"resampling needs at least 2 particles, got N={n}.")
    if log_weights.shape != (n,):
        raise ValueError(
            f"log_weights must have shape (N,) = ({n},) to match particles of shape "
            f"{particles.shape}; got {log_weights.shape}."
        )
    flat = particles.reshape(n, -1)
    if jnp.issubdtype(particles.dtype, jnp.floating):
        finite = jnp.all(jnp.isfinite(flat), axis=1)
        flat = jnp.where(finite[:, None], flat, jnp.zeros((), flat.dtype))
        log_weights = jnp.where(finite, log_weights.astype(flat.dtype), -jnp.inf)
    elif require_float:
        raise TypeError(
            f"particles must be floating point for this resampler, got dtype "
            f"{particles.dtype}; index resamplers (systematic, ...) accept discrete states."
        )
    else:
        log_weights = log_weights.astype(jnp.result_type(float))
    normalized, _ = log_normalize(log_weights)
    return PreparedInput(flat, normalized, particles.shape[1:])


def uniform_log_weights(n: int, dtype: jnp.dtype) -> Array:
    """Log-weights $-\\log N$ of shape `(N,)`."""
    return jnp.full((n,), -math.log(n), dtype)


def whitening_scale(weights: Array, centered: Array, jitter: float) -> Array:
    """Per-coordinate scale $\\sqrt{\\sigma^2 (1 + \\text{jitter}) + \\sqrt{\\text{tiny}}}$.

    $\\sigma^2$ is the weighted variance. It is computed relative to the largest deviation
    (held constant for differentiation), so deviations whose squares overflow (above about
    $10^{19}$ in float32) still give a finite scale and gradient.

    Args:
        weights: normalised weights, shape `(N,)`.
        centered: particles minus their weighted mean, shape `(N, d)`; rows of zero weight
            must be zero.
        jitter: relative variance floor.

    Returns:
        Shape `(d,)`, at least $\\text{tiny}^{1/4}$.
    """
    floor = jnp.finfo(centered.dtype).tiny ** 0.25  # floor**2 = sqrt(tiny)
    largest = jax.lax.stop_gradient(jnp.max(jnp.abs(centered), axis=0))
    # Never below the floor, so (floor / magnitude)^2 <= 1 cannot overflow, and the square
    # root's argument stays positive (its derivative finite) for a collapsed cloud.
    magnitude = jnp.maximum(largest, floor)
    relative = weights @ (centered / magnitude) ** 2
    return magnitude * jnp.sqrt(relative * (1.0 + jitter) + (floor / magnitude) ** 2)
