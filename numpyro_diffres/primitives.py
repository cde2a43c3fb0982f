"""The NumPyro face: sites that put a particle-filter likelihood into a NumPyro model.

`particle_factor` registers the per-time log-likelihood increments with `numpyro.factor`, so
`SVI`, `MCMC(NUTS)`, `Predictive`, `numpyro.infer.log_likelihood` and `az.from_numpyro` work on
the model unchanged. Which noise the filter uses decides what inference targets:

* Under `MCMC(NUTS(...))` `numpyro.prng_key()` returns the same key at every potential
  evaluation, so the filter runs with common random numbers: NUTS samples
  $p(\\theta)\\,\\hat p_N(y \\mid \\theta; u)$ for one fixed noise draw $u$. With diffusion
  resampling that surface is smooth in $\\theta$, so NUTS can move; it approaches the exact
  posterior as $N$ grows. It is *not* pseudo-marginal MCMC: the noise is never refreshed, and
  with small $N$ the posterior is that of one particular likelihood estimate.
* Under `SVI` the seed handler hands a fresh key at each step: stochastic gradients of the
  particle ELBO surrogate.
* Without a seed handler (e.g. `numpyro.infer.log_likelihood`, which `az.from_numpyro` calls)
  there is no key: a fixed default key is used, so the call never fails.
"""

import warnings

import jax
import numpyro
from jax.typing import DTypeLike

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.checks import check_key, check_name
from numpyro_diffres.filtering import FilterResult, particle_filter
from numpyro_diffres.resampling import Resampler
from numpyro_diffres.ssm import StateSpaceModel, simulate

__all__ = ["particle_factor", "sample_trajectory"]

DEFAULT_SEED = 0


def _resolve_key(key: PRNGKey | None, argument: str = "key") -> PRNGKey:
    """An explicit key wins; else the seed handler's key; else a fixed default key."""
    if key is not None:
        check_key(key, argument)
        return key
    with warnings.catch_warnings():
        # prng_key() warns outside a seed handler; falling back is the documented behaviour.
        warnings.simplefilter("ignore", UserWarning)
        key = numpyro.prng_key()
    return jax.random.PRNGKey(DEFAULT_SEED) if key is None else key


def particle_factor(
    name: str,
    model: StateSpaceModel,
    observations: Array,
    *,
    num_particles: int,
    resampler: Resampler | None = None,
    key: PRNGKey | None = None,
    ess_threshold: float = 1.0,
    record: bool = False,
    particle_sharding: jax.sharding.Sharding | None = None,
    dtype: DTypeLike | None = None,
) -> FilterResult:
    """Add a particle-filter log-likelihood to the enclosing NumPyro model.

    Registers `numpyro.factor(name, increments)` with the per-time increments of shape `(T,)`,
    so the model's log density gains the estimate of $\\log p(y_{0:T-1} \\mid \\theta)$ and
    ArviZ gets a time-indexed `log_likelihood` group (for `az.loo` / `az.waic` over time steps).

    Key semantics: an explicit `key` wins; otherwise `numpyro.prng_key()` (fresh per SVI step,
    fixed under NUTS: the fixed-noise surrogate described in the module docstring); otherwise,
    with no seed handler, the fixed key `jax.random.PRNGKey(0)`.

    Args:
        name: site name of the factor; must be unique in the model.
        model: the state-space model, typically built inside the NumPyro model from sampled
            parameters.
        observations: `(T, *observation_shape)`; NaN rows are missing.
        num_particles: $N$.
        resampler: default `resampling.diffusion()` (differentiable; index resamplers make
            the fixed-key surface piecewise constant, which NUTS cannot sample).
        key: optional explicit PRNG key.
        ess_threshold: see `particle_filter`; keep 1.0 under NUTS.
        record: also record `{name}_filtered_mean`, `{name}_filtered_variance` and
            `{name}_ess` as `numpyro.deterministic` sites.
        particle_sharding: optional sharding of the particle axis across devices; see
            `particle_filter`.
        dtype: optional floating dtype of the particles, e.g. `jnp.float32` to run the filter
            in single precision while NUTS works in float64; see `particle_filter`.

    Returns:
        The `FilterResult`, for further use in the model.

    Raises:
        TypeError: `name` is not a string, `key` is not a PRNG key, or `resampler` is not
            callable.
        ValueError: observations that do not fit the emission, bad `num_particles`.
    """
    check_name(name)
    key = _resolve_key(key)
    result = particle_filter(
        key,
        model,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        ess_threshold=ess_threshold,
        particle_sharding=particle_sharding,
        dtype=dtype,
    )
    numpyro.factor(name, result.log_likelihood_increments)
    if record:
        numpyro.deterministic(f"{name}_filtered_mean", result.filtered_mean)
        numpyro.deterministic(f"{name}_filtered_variance", result.filtered_variance)
        numpyro.deterministic(f"{name}_ess", result.ess)
    return result


def sample_trajectory(
    name: str, model: StateSpaceModel, num_steps: int, *, key: PRNGKey | None = None
) -> tuple[Array, Array]:
    """Simulate the model inside a NumPyro model and record the path.

    Records `{name}_states` `(T, *state_shape)` and `{name}_observations`
    `(T, *observation_shape)` as deterministic sites, so `Predictive` returns prior or
    posterior predictive paths (a fresh key per draw from the seed handler).

    Args:
        name: prefix of the two site names.
        model: the state-space model.
        num_steps: $T$.
        key: optional explicit key (default: the seed handler's, else a fixed key).

    Returns:
        `(states, observations)`.
    """
    check_name(name)
    states, observations = simulate(_resolve_key(key), model, num_steps)
    numpyro.deterministic(f"{name}_states", states)
    numpyro.deterministic(f"{name}_observations", observations)
    return states, observations
