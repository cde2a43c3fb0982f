"""Stop-gradient resampling: index draws with the score-function gradient.

Ścibior & Wood, "Differentiable particle filtering without modifying the forward pass", 2021.

The forward pass is the base index resampler's. The returned log-weights are
$-\\log N + l_{I} - \\mathrm{sg}(l_{I})$: uniform in value, but their gradient is that of the
score-function (REINFORCE) estimator. The gradient of the filter's likelihood estimate
$\\hat p(y)$ is then unbiased for $\\nabla p(y)$; the gradient of its logarithm, which is what
NUTS and SVI use, is not (it is a ratio of two estimates), only consistent as $N$ grows.
"""

import dataclasses
import math

import jax

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_kind
from numpyro_diffres.resampling.base import PicksAncestors, prepare
from numpyro_diffres.resampling.index import IndexResampler, systematic

__all__ = ["StopGradient", "stop_gradient"]


@dataclasses.dataclass(frozen=True)
class StopGradient(PicksAncestors):
    """Stop-gradient resampling around an index resampler."""

    base: IndexResampler

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; log-weights uniform in value, carrying the score-function gradient."""
        flat, normalized, event_shape = prepare(log_weights, particles, require_float=False)
        n = flat.shape[0]
        ancestors = self.base.indices(key, normalized, n)
        chosen = normalized[ancestors]
        new_log_weights = -math.log(n) + chosen - jax.lax.stop_gradient(chosen)
        return flat[ancestors].reshape(n, *event_shape), new_log_weights


def stop_gradient(base: IndexResampler | None = None) -> StopGradient:
    """Stop-gradient resampling.

    Args:
        base: the index resampler that draws the ancestors; default `systematic()`.

    Raises:
        TypeError: `base` is not an index resampler (multinomial, systematic or stratified).
    """
    base = systematic() if base is None else base
    check_kind(
        base,
        IndexResampler,
        "stop_gradient(base) needs an index resampler such as systematic(), multinomial() "
        "or stratified()",
    )
    return StopGradient(base)
