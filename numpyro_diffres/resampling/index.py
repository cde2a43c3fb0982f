"""Index resampling: multinomial, systematic and stratified.

These draw ancestor indices and copy particles. They are unbiased but not differentiable: the
indices are piecewise constant in the weights, so autodiff sees only the pathwise term through
the copied particle values (a biased gradient), and a fixed-noise likelihood built on them jumps
whenever an index flips. Systematic and stratified draws reuse `blackjax.smc.resampling`.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.resampling.base import PicksAncestors, prepare, uniform_log_weights
from numpyro_diffres.resampling.sorted import SortedSystematic, sorted_systematic

__all__ = ["IndexResampler", "multinomial", "stratified", "systematic"]


def _multinomial(key: PRNGKey, weights: Array, num_samples: int) -> Array:
    """Multinomial indices from sorted uniforms (normalised cumulative exponential spacings).

    `jax.random.exponential` is $-\\log(1 - u)$, finite for every $u \\in [0, 1)$; the
    $-\\log u$ spacings of `blackjax.smc.resampling.multinomial` are $+\\infty$ when a float32
    uniform is exactly 0 (probability $2^{-23}$ per draw, about $6 \\cdot 10^{-5}$ per call at
    N = 512), which turns the sorted uniforms into 0 and NaN and collapses the draw onto the
    first and last particles whatever their weights.
    """
    spacings = jax.random.exponential(key, (num_samples + 1,), weights.dtype)
    totals = jnp.cumsum(spacings)
    return jnp.searchsorted(jnp.cumsum(weights), totals[:-1] / totals[-1])


def _blackjax_scheme(name: str) -> Callable[[PRNGKey, Array, int], Array]:
    """`blackjax.smc.resampling.<name>`, imported on first use.

    Importing blackjax creates JAX arrays, which starts JAX's backend; at package import that
    would make a later `numpyro.set_host_device_count(...)` silently ineffective.
    """

    def draw(key: PRNGKey, weights: Array, num_samples: int) -> Array:
        from blackjax.smc import resampling  # noqa: PLC0415

        return getattr(resampling, name)(key, weights, num_samples)

    return draw


_SCHEMES: dict[str, Callable[[PRNGKey, Array, int], Array]] = {
    "multinomial": _multinomial,
    "systematic": _blackjax_scheme("systematic"),
    "stratified": _blackjax_scheme("stratified"),
}


@dataclasses.dataclass(frozen=True)
class IndexResampler(PicksAncestors):
    """Resample by drawing ancestor indices.

    Attributes:
        scheme: `"multinomial"`, `"systematic"` or `"stratified"`.
    """

    scheme: str

    def indices(self, key: PRNGKey, log_weights: Array, num_samples: int) -> Array:
        """Draw `num_samples` ancestor indices from normalised `log_weights` (no gradient)."""
        weights = jnp.exp(jax.lax.stop_gradient(log_weights))
        indices = _SCHEMES[self.scheme](key, weights, num_samples)
        # The float cumulative sum can end just below 1 (by ~N ulps), and a uniform can be
        # exactly 0: such draws fall past the last (or before the first) particle of positive
        # weight onto a zero-weight one. They belong to the nearest positive-weight particle.
        positive = weights > 0
        first = jnp.argmax(positive)
        last = weights.shape[0] - 1 - jnp.argmax(positive[::-1])
        return jnp.clip(indices, first, last)

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; returns `(particles, log_weights)` with uniform log-weights."""
        particles, log_weights, _ = self.resample_with_ancestors(key, log_weights, particles)
        return particles, log_weights

    def resample_with_ancestors(
        self, key: PRNGKey, log_weights: Array, particles: Array
    ) -> tuple[Array, Array, Array]:
        """Resample and say where each new particle came from.

        Returns:
            `(particles, log_weights, ancestors)`: the call's output and the ancestor index
            `(N,)` of each new particle (what smoothing by genealogy follows).
        """
        flat, normalized, event_shape = prepare(log_weights, particles, require_float=False)
        n = flat.shape[0]
        ancestors = self.indices(key, normalized, n)
        particles = flat[ancestors].reshape(n, *event_shape)
        return particles, uniform_log_weights(n, normalized.dtype), ancestors

    def driven_by_noise(self) -> SortedSystematic | None:
        """The scheme taking standard normals in place of a key, or None.

        Systematic resampling: `sorted_systematic()`, its uniform $\\Phi(u)$ of one standard
        normal over the particles in a fixed (sorted) order, still unbiased. Multinomial and
        stratified resampling have no noise-driven form here.
        """
        return sorted_systematic() if self.scheme == "systematic" else None


def multinomial() -> IndexResampler:
    """Multinomial resampling: N independent categorical draws."""
    return IndexResampler("multinomial")


def systematic() -> IndexResampler:
    """Systematic resampling: one uniform shared by N evenly spaced points (lowest variance)."""
    return IndexResampler("systematic")


def stratified() -> IndexResampler:
    """Stratified resampling: one uniform in each of N equal strata."""
    return IndexResampler("stratified")
