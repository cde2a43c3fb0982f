"""Index resampling: multinomial, systematic and stratified.

These draw ancestor indices and copy particles. They are unbiased but not differentiable: the
indices are piecewise constant in the weights, so autodiff sees only the pathwise term through
the copied particle values (a biased gradient), and a fixed-noise likelihood built on them jumps
whenever an index flips. The index draws reuse `blackjax.smc.resampling`.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from blackjax.smc import resampling as blackjax_resampling

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.resampling.base import prepare, uniform_log_weights

__all__ = ["IndexResampler", "multinomial", "stratified", "systematic"]

_SCHEMES: dict[str, Callable[[PRNGKey, Array, int], Array]] = {
    "multinomial": blackjax_resampling.multinomial,
    "systematic": blackjax_resampling.systematic,
    "stratified": blackjax_resampling.stratified,
}


@dataclasses.dataclass(frozen=True)
class IndexResampler:
    """Resample by drawing ancestor indices.

    Attributes:
        scheme: `"multinomial"`, `"systematic"` or `"stratified"`.
    """

    scheme: str

    def indices(self, key: PRNGKey, log_weights: Array, num_samples: int) -> Array:
        """Draw `num_samples` ancestor indices from normalised `log_weights` (no gradient)."""
        weights = jnp.exp(jax.lax.stop_gradient(log_weights))
        return _SCHEMES[self.scheme](key, weights, num_samples)

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; returns `(particles, log_weights)` with uniform log-weights."""
        flat, normalized, event_shape = prepare(log_weights, particles, require_float=False)
        n = flat.shape[0]
        ancestors = self.indices(key, normalized, n)
        return flat[ancestors].reshape(n, *event_shape), uniform_log_weights(n, normalized.dtype)


def multinomial() -> IndexResampler:
    """Multinomial resampling: N independent categorical draws."""
    return IndexResampler("multinomial")


def systematic() -> IndexResampler:
    """Systematic resampling: one uniform shared by N evenly spaced points (lowest variance)."""
    return IndexResampler("systematic")


def stratified() -> IndexResampler:
    """Stratified resampling: one uniform in each of N equal strata."""
    return IndexResampler("stratified")
