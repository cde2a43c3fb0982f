"""Linear-Gaussian state-space models and their exact likelihood (the oracle).

$$x_0 \\sim N(m_0, P_0), \\quad x_t = F x_{t-1} + N(0, Q), \\quad y_t = H x_t + N(0, R).$$

`kalman_log_likelihood` uses dynamax's Kalman filter (same first-state-emits convention) and is
differentiable in every matrix; `dense_log_likelihood` builds the joint Gaussian of all
observations, which also handles missing observations exactly (small T only).
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpyro.distributions as dist

from numpyro_diffres._typing import Array
from numpyro_diffres.ssm import StateSpaceModel

__all__ = [
    "LinearGaussianParams",
    "dense_log_likelihood",
    "kalman_filtered_moments",
    "kalman_log_likelihood",
    "linear_gaussian",
]


class LinearGaussianParams(NamedTuple):
    """Matrices of a linear-Gaussian SSM (state dimension d, observation dimension p).

    Attributes:
        initial_mean: $m_0$, `(d,)`.
        initial_cov: $P_0$, `(d, d)`.
        transition_matrix: $F$, `(d, d)`.
        transition_cov: $Q$, `(d, d)`.
        emission_matrix: $H$, `(p, d)`.
        emission_cov: $R$, `(p, p)`.
    """

    initial_mean: Array
    initial_cov: Array
    transition_matrix: Array
    transition_cov: Array
    emission_matrix: Array
    emission_cov: Array


def linear_gaussian(params: LinearGaussianParams) -> StateSpaceModel:
    """The `StateSpaceModel` of a linear-Gaussian SSM (vector state `(d,)`, observation `(p,)`)."""
    transition_tril = jnp.linalg.cholesky(params.transition_cov)
    emission_tril = jnp.linalg.cholesky(params.emission_cov)
    return StateSpaceModel(
        initial=dist.MultivariateNormal(params.initial_mean, params.initial_cov),
        transition=lambda x, t: dist.MultivariateNormal(
            params.transition_matrix @ x, scale_tril=transition_tril
        ),
        emission=lambda x, t: dist.MultivariateNormal(
            params.emission_matrix @ x, scale_tril=emission_tril
        ),
    )


def kalman_log_likelihood(params: LinearGaussianParams, observations: Array) -> Array:
    """Exact $\\log p(y_{0:T-1})$ by dynamax's Kalman filter; observations `(T, p)`.

    Raises:
        ImportError: dynamax is not installed (`pip install numpyro_diffres[test]`).
    """
    return _dynamax_filter(params, observations).marginal_loglik


def kalman_filtered_moments(params: LinearGaussianParams, observations: Array):
    """Exact filtering means `(T, d)` and covariances `(T, d, d)` from dynamax."""
    posterior = _dynamax_filter(params, observations)
    return posterior.filtered_means, posterior.filtered_covariances


def _dynamax_filter(params: LinearGaussianParams, observations: Array):
    try:
        from dynamax.linear_gaussian_ssm import ParamsLGSSM, lgssm_filter
        from dynamax.linear_gaussian_ssm.inference import (
            ParamsLGSSMDynamics,
            ParamsLGSSMEmissions,
            ParamsLGSSMInitial,
        )
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Kalman oracle needs dynamax: pip install 'numpyro_diffres[test]'."
        ) from error
    d = params.initial_mean.shape[0]
    p = params.emission_matrix.shape[0]
    dtype = params.initial_mean.dtype
    # TFP (inside dynamax) refuses observations of another float dtype than the parameters
    # instead of promoting them, e.g. float32 data in a float64 model; use the model's dtype.
    observations = jnp.asarray(observations, dtype)
    lgssm = ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=params.initial_mean, cov=params.initial_cov),
        dynamics=ParamsLGSSMDynamics(
            weights=params.transition_matrix,
            bias=jnp.zeros(d, dtype),
            input_weights=jnp.zeros((d, 0), dtype),
            cov=params.transition_cov,
        ),
        emissions=ParamsLGSSMEmissions(
            weights=params.emission_matrix,
            bias=jnp.zeros(p, dtype),
            input_weights=jnp.zeros((p, 0), dtype),
            cov=params.emission_cov,
        ),
    )
    return lgssm_filter(lgssm, observations)


def dense_log_likelihood(params: LinearGaussianParams, observations: Array) -> Array:
    """Exact $\\log p(y_{\\mathrm{obs}})$ from the joint Gaussian; NaN rows are left out.

    Builds the $(Tp \\times Tp)$ covariance, so use it for small T.
    """
    num_steps, p = observations.shape
    F, Q = params.transition_matrix, params.transition_cov
    means, covs = [params.initial_mean], [params.initial_cov]
    for _ in range(1, num_steps):
        means.append(F @ means[-1])
        covs.append(F @ covs[-1] @ F.T + Q)
    # Cov(x_s, x_t) = F^{t-s} Cov(x_s) for t >= s.
    blocks = [[None] * num_steps for _ in range(num_steps)]
    for s in range(num_steps):
        propagated = covs[s]
        for t in range(s, num_steps):
            blocks[t][s] = propagated
            blocks[s][t] = propagated.T
            propagated = F @ propagated
    state_cov = jnp.block(blocks)
    H = jnp.kron(jnp.eye(num_steps, dtype=F.dtype), params.emission_matrix)
    R = jnp.kron(jnp.eye(num_steps, dtype=F.dtype), params.emission_cov)
    mean = H @ jnp.concatenate(means)
    cov = H @ state_cov @ H.T + R
    flat = observations.reshape(-1)
    observed = ~jnp.isnan(observations).any(axis=1)
    keep = jnp.repeat(observed, p)
    index = jnp.nonzero(keep)[0]
    return dist.MultivariateNormal(mean[index], cov[jnp.ix_(index, index)]).log_prob(flat[index])
