"""Gradient decay: damp the derivative that flows back through the particle history.

The pathwise derivative of a particle with respect to a parameter obeys
$\\partial x_t = f'(x_{t-1})\\,\\partial x_{t-1} + \\partial_\\theta f$: along a particle's
history it is multiplied by the transition's Jacobian at every step. Where $|f'| > 1$ (an
expansive or chaotic transition, e.g. the nonlinear growth model with $|f'|$ up to 25) it grows
geometrically, and the fixed-noise log-likelihood surface, although continuous, becomes so
steep and wiggly that its gradient is useless to NUTS or an optimiser.

`gradient_decay(resampler, factor)` wraps any resampler and returns its output $x^*$ as
$\\mathrm{sg}(x^*) + \\text{factor}\\,(x^* - \\mathrm{sg}(x^*))$ ($\\mathrm{sg}$: stop-gradient),
and likewise the log-weights. The value is unchanged, so the filter's log-likelihood estimate
is the same number; its derivative through each resampling is multiplied by `factor`, so a term
that reaches back $k$ resampling steps is damped by $\\text{factor}^k$: an effective window of
about $1/(1 - \\text{factor})$ steps. `factor=1` is the plain resampler, `factor=0` keeps only
each step's own propagation and weighting (the history's particles held constant).

The gradient is then biased (it omits how the parameter moves the past filtering
distributions), in exchange for bounded variance. Under NUTS the sampler still targets the same
fixed-noise surface: the leapfrog map with any position-dependent force is reversible and
volume-preserving, and the accept/reject step uses the unchanged values. A force that no longer
matches the surface's local wiggles costs acceptance, not correctness.
"""

import dataclasses

import jax

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_fraction, check_kind
from numpyro_diffres.resampling.base import Resampler, Wrapper

__all__ = ["GradientDecay", "gradient_decay"]


def _damp(value: Array, factor: float) -> Array:
    frozen = jax.lax.stop_gradient(value)
    return frozen + factor * (value - frozen)


@dataclasses.dataclass(frozen=True)
class GradientDecay(Wrapper):
    """A resampler whose output carries `factor` times the derivative of `resampler`'s."""

    factor: float

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample with `resampler`; same values, derivatives multiplied by `factor`."""
        new_particles, new_log_weights = self.resampler(key, log_weights, particles)
        if self.factor == 1.0:
            return new_particles, new_log_weights
        if not jax.numpy.issubdtype(new_particles.dtype, jax.numpy.inexact):
            # Discrete states carry no derivative; only the weights are damped.
            return new_particles, _damp(new_log_weights, self.factor)
        return _damp(new_particles, self.factor), _damp(new_log_weights, self.factor)


def gradient_decay(resampler: Resampler, factor: float = 0.5) -> GradientDecay:
    """Damp the derivative through the particle history by `factor` per resampling.

    Args:
        resampler: any resampler `(key, log_weights, particles) -> (particles, log_weights)`,
            e.g. `diffusion()`.
        factor: in $[0, 1]$; the derivative through each resampling is multiplied by it
            (effective window $1/(1 - \\text{factor})$ steps). 1 changes nothing; 0 stops the
            derivative through the history entirely.

    Returns:
        A resampler with the same values as `resampler` and damped derivatives.

    Raises:
        TypeError: `resampler` is not callable, or `factor` is not a number.
        ValueError: `factor` outside $[0, 1]$.
    """
    check_kind(
        resampler,
        callable,
        "gradient_decay(resampler, factor) needs a resampler callable as "
        "resampler(key, log_weights, particles), e.g. diffusion()",
    )
    factor = check_fraction(
        "factor",
        factor,
        meaning="1 keeps the full gradient, 0 stops it through the particle history",
    )
    return GradientDecay(resampler, factor)
