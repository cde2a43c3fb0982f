"""Robust adaptive Metropolis: the random-walk proposal tuned during warm-up.

Vihola (2012), "Robust adaptive Metropolis algorithm with coerced acceptance rate", Statistics
and Computing 22. The proposal is $\\theta' = \\theta + S U$ with $U \\sim N(0, I)$; after each
warm-up step the lower-triangular factor $S$ is updated so that

$$S_{n+1} S_{n+1}^\\top = S_n \\Big(I + \\eta_n (\\alpha_n - \\alpha^*)
\\frac{U U^\\top}{\\lVert U \\rVert^2}\\Big) S_n^\\top, \\qquad \\eta_n = \\min(1, d\\, n^{-2/3}),$$

which learns the shape of the posterior (as Haario's adaptive Metropolis does) and the scale
that gives the target acceptance rate $\\alpha^*$ at once. The factor in brackets is positive
definite because $\\eta_n \\le 1$ and $\\alpha^* < 1$. After warm-up $S$ is frozen, so the
sampling phase is a plain Metropolis-Hastings chain.
"""

import jax.numpy as jnp

from numpyro_diffres._typing import Array

__all__ = ["robust_adaptive_update"]

DECAY_EXPONENT = 2.0 / 3.0


def robust_adaptive_update(
    scale_tril: Array, direction: Array, accept_prob: Array, iteration: Array, target: float
) -> Array:
    """One RAM update of the proposal's Cholesky factor.

    Args:
        scale_tril: current lower-triangular factor $S$, `(d, d)`.
        direction: the standard-normal draw $U$ of this step's proposal, `(d,)`.
        accept_prob: this step's acceptance probability $\\alpha_n$ in $[0, 1]$.
        iteration: $n \\ge 1$, the warm-up step's number.
        target: the acceptance rate $\\alpha^*$ to coerce, in $(0, 1)$.

    Returns:
        The updated factor, `(d, d)`.
    """
    dimension = direction.shape[0]
    rate = jnp.minimum(1.0, dimension * iteration ** (-DECAY_EXPONENT))
    unit = direction / jnp.maximum(jnp.linalg.norm(direction), jnp.finfo(direction.dtype).tiny)
    shaped = scale_tril @ unit
    covariance = scale_tril @ scale_tril.T + rate * (accept_prob - target) * jnp.outer(
        shaped, shaped
    )
    return jnp.linalg.cholesky(covariance)
