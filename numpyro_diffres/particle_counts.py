r"""How many particles: the rules that choose $N$ from the spread of the likelihood estimate.

One doubling rule (`_num_particles_rule`) serves every route: `choose_num_particles` (a
`StateSpaceModel` and `particle_filter`, the fixed-key NUTS route), `choose_marginal_num_particles`
(a program marginalised by `marginalize`) and `choose_pmmh_num_particles` (a NumPyro model for
the pseudo-marginal kernels of `infer`). Each measures, over keys, the spread of a
log-likelihood estimate (or of the log-ratio of two correlated estimates) at plausible
parameters, and grows $N$ as the SD scales, about $\sqrt{T / N}$.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.typing import DTypeLike
from numpyro import handlers
from numpyro.infer.util import log_density

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import (
    check_callable,
    check_count,
    check_key,
    check_numpyro_model,
    check_positive,
)
from numpyro_diffres.filtering import particle_filter
from numpyro_diffres.infer.sites import NOISE_FLAG
from numpyro_diffres.marginalize import marginalize
from numpyro_diffres.resampling import Resampler
from numpyro_diffres.ssm import StateSpaceModel

__all__ = [
    "ParticleCount",
    "choose_marginal_num_particles",
    "choose_num_particles",
    "choose_pmmh_num_particles",
]

# Doucet, Pitt, Deligiannidis and Kohn (2015): PMMH is most efficient per unit of computing
# time with a log-likelihood SD of about 1.2-1.5 at central parameters.
PMMH_TARGET_SD = 1.2


class ParticleCount(NamedTuple):
    """What `choose_num_particles` returns.

    Attributes:
        num_particles: the first tried $N$ whose log-likelihood SD was at most the target (the
            largest tried when none was).
        sd: the standard deviation over keys of the log-likelihood estimate at that $N$.
        tried: `((N, sd), ...)` for every $N$ tried, in order.
        reached: whether `sd` is at most the target (False when `max_particles` stopped it).
    """

    num_particles: int
    sd: float
    tried: tuple[tuple[int, float], ...]
    reached: bool


def choose_num_particles(
    key: PRNGKey,
    model_fn: Callable[[Any], StateSpaceModel],
    observations: Array,
    params: Any,
    *,
    target_sd: float = 1.0,
    initial: int = 64,
    max_particles: int = 8192,
    num_keys: int = 16,
    resampler: Resampler | None = None,
    dtype: DTypeLike | None = None,
) -> ParticleCount:
    """The number of particles whose log-likelihood estimate has SD about `target_sd`.

    The rule: choose $N$ so that the standard deviation over keys of $\\log \\hat p_N(y \\mid
    \\theta)$, at plausible parameters (a posterior mode or an SVI estimate), is about 1. Under
    NUTS the fixed key freezes one draw of that noise: an SD of 1 bounds how far the surrogate
    posterior's log-density sits from the exact one (in the pseudo-marginal literature, SD
    1-1.7 balances cost against mixing). The SD scales about as $\\sqrt{T / N}$, so from the SD
    measured at $N$ the next try is the power of two at or above $N\\,(\\mathrm{sd} /
    \\mathrm{target})^2$, until the target is met or `max_particles` is reached.

    Args:
        key: PRNG key; `num_keys` filters are run from it at each $N$.
        model_fn: `model_fn(params) -> StateSpaceModel`.
        observations: `(T, *observation_shape)`.
        params: the parameters to measure at, as `model_fn` takes them.
        target_sd: the SD to reach (default 1.0).
        initial: the first $N$ tried (default 64).
        max_particles: the largest $N$ tried (default 8192).
        num_keys: filters per $N$ (default 16; the SD's own relative error is about
            $1 / \\sqrt{2 \\cdot \\text{num\\_keys}}$).
        resampler: as for `particle_filter` (default diffusion).
        dtype: as for `particle_filter`.

    Returns:
        A `ParticleCount`.

    Raises:
        TypeError: `model_fn` not callable, a non-integer count, a bad key.
        ValueError: a non-positive `target_sd`, `initial` below 2, `max_particles` below
            `initial`, `num_keys` below 2, a log-likelihood that is not finite at `params`.
    """
    check_key(key)

    def log_likelihood_at(num_particles: int) -> Callable[[PRNGKey], Array]:
        log_likelihood_fn = _filter_log_likelihood(
            model_fn, observations, num_particles=num_particles, resampler=resampler, dtype=dtype
        )
        return lambda key: log_likelihood_fn(key, params)

    return _num_particles_rule(key, log_likelihood_at, target_sd, initial, max_particles, num_keys)


def choose_marginal_num_particles(
    key: PRNGKey,
    model: Callable,
    params: dict[str, Any],
    *,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    target_sd: float = 1.0,
    initial: int = 64,
    max_particles: int = 8192,
    num_keys: int = 16,
    **marginalize_options: Any,
) -> ParticleCount:
    """`choose_num_particles` for a NumPyro program marginalised by `marginalize`.

    The same rule, measured on the log-density NUTS would see: `marginalize(model,
    num_particles=N, **marginalize_options)` evaluated at the static sites' values `params`
    (as `numpyro.infer.util.log_density` takes them: constrained values by site name, e.g. an
    SVI or optimiser estimate, or a pilot run's posterior mean), once per key through
    `numpyro.handlers.seed`. The priors' terms do not depend on the key, so the spread over
    keys is the marginal log-likelihood's.

    Args:
        key: PRNG key; `num_keys` keys are split from it, the same at every $N$.
        model: the NumPyro program (a `scan` over the latent path, as `marginalize` takes).
        params: `{site name: value}` for every static (non-marginalised) sample site.
        model_args: positional arguments of `model`.
        model_kwargs: keyword arguments of `model`.
        target_sd: the SD to reach (default 1.0).
        initial: the first $N$ tried (default 64).
        max_particles: the largest $N$ tried (default 8192).
        num_keys: log-densities per $N$ (default 16).
        **marginalize_options: passed to `marginalize` (e.g. `resampler`).

    Returns:
        A `ParticleCount`.

    Raises:
        TypeError: `model` not callable, `params` not a dict, a non-integer count, a bad key.
        ValueError: as for `choose_num_particles`; a static site missing from `params`;
            `marginalize`'s own errors at trace time.
    """
    check_key(key)
    check_numpyro_model(model, "program")
    _check_params(params)
    model_kwargs = {} if model_kwargs is None else model_kwargs

    def log_likelihood_at(num_particles: int) -> Callable[[PRNGKey], Array]:
        marginal = marginalize(model, num_particles=num_particles, **marginalize_options)

        def log_joint(key):
            value, trace = log_density(
                handlers.seed(marginal, key), model_args, model_kwargs, params
            )
            _check_statics(trace, params)
            return value

        return log_joint

    return _num_particles_rule(key, log_likelihood_at, target_sd, initial, max_particles, num_keys)


def _num_particles_rule(
    key: PRNGKey,
    log_likelihood_at: Callable[[int], Callable[[PRNGKey], Array]],
    target_sd: float,
    initial: int,
    max_particles: int,
    num_keys: int,
) -> ParticleCount:
    """The doubling rule of `choose_num_particles`.

    `log_likelihood_at(N)` is `key -> log-likelihood estimate` at $N$ particles; it is run,
    jitted and vmapped, on the same `num_keys` keys split from `key` at every $N$.
    """
    check_positive("target_sd", target_sd)
    initial = check_count("initial", initial, minimum=2)
    max_particles = check_count("max_particles", max_particles, minimum=initial)
    num_keys = check_count("num_keys", num_keys, minimum=2)
    keys = jax.random.split(key, num_keys)

    def sd_at(num_particles: int) -> float:
        run = jax.jit(jax.vmap(log_likelihood_at(num_particles)))
        values = np.asarray(run(keys), dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"the log-likelihood at params is not finite at N = {num_particles} "
                f"({np.sum(~np.isfinite(values))} of {num_keys} keys): measure at plausible "
                "parameters (e.g. a prior draw that fits, or an SVI estimate)."
            )
        return float(np.std(values, ddof=1))

    tried = []
    num_particles = initial
    while True:
        sd = sd_at(num_particles)
        tried.append((num_particles, sd))
        if sd <= target_sd or num_particles >= max_particles:
            return ParticleCount(num_particles, sd, tuple(tried), sd <= target_sd)
        wanted = num_particles * (sd / target_sd) ** 2
        next_count = 1 << max(0, math.ceil(math.log2(wanted)))
        num_particles = min(max(next_count, 2 * num_particles), max_particles)


def _filter_log_likelihood(
    model_fn: Callable[[Any], StateSpaceModel], observations: Array, **filter_kwargs: Any
) -> Callable[[PRNGKey, Any], Array]:
    """`(key, params) -> particle_filter(key, model_fn(params), observations, ...)` value."""
    check_callable("model_fn", model_fn, "model_fn(params) -> StateSpaceModel")

    def log_likelihood_fn(key, params):
        model = model_fn(params)
        if not isinstance(model, StateSpaceModel):
            raise TypeError(
                f"model_fn(params) must return a StateSpaceModel, got {type(model).__name__}."
            )
        return particle_filter(key, model, observations, **filter_kwargs).log_likelihood

    return log_likelihood_fn


def choose_pmmh_num_particles(
    key: PRNGKey,
    model: Callable,
    params: dict[str, Any],
    *,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    num_particles_argument: str = "num_particles",
    correlation: float = 0.0,
    target_sd: float | None = None,
    initial: int = 16,
    max_particles: int = 8192,
    num_keys: int = 16,
) -> ParticleCount:
    """$N$ for `infer.PMMH` / `infer.CorrelatedPMMH` on a NumPyro model.

    The model takes its number of particles as the keyword argument `num_particles_argument`
    and builds its likelihood with `particle_factor`. At the statics' values `params`
    (constrained, by site name: a pilot run's posterior mean, say) the rule measures, over
    `num_keys` keys, the spread of what the kernel's accept step sees:

    * `correlation = 0` (PMMH): the SD of the log-likelihood estimate; default target 1.2,
      where PMMH is most efficient per unit of computation (Doucet, Pitt, Deligiannidis and
      Kohn 2015). Noise sites (`noise="sampled"`) are drawn afresh per key.
    * `correlation = rho > 0` (correlated PMMH, the model's factors with `noise="sampled"`):
      the SD of the log-ratio $\\log \\hat p(y \\mid \theta, u') - \\log \\hat p(y \\mid
      \theta, u)$ between noise $u$ and its Crank-Nicolson move $u' = \rho u + \\sqrt{1 -
      \rho^2} \varepsilon$; default target 1.0. This is what correlation buys: the ratio's
      SD grows far more slowly with $T / N$ than the estimate's.

    Args:
        key: PRNG key; the same keys are used at every $N$.
        model: the NumPyro model.
        params: `{site name: value}` of every static latent site.
        model_args: positional arguments of `model`.
        model_kwargs: keyword arguments of `model` (without the particle count).
        num_particles_argument: the keyword through which `model` takes $N$.
        correlation: the kernel's Crank-Nicolson $\rho$ in $[0, 1)$.
        target_sd: the SD to reach (defaults above).
        initial: the first $N$ tried.
        max_particles: the largest $N$ tried.
        num_keys: estimates per $N$.

    Returns:
        A `ParticleCount` (its `sd` is the log-ratio's SD when `correlation > 0`).

    Raises:
        TypeError: `model` not callable, `params` not a dict.
        ValueError: `correlation` outside $[0, 1)$, a correlated rule on a model without noise
            sites, a static site missing from `params`; as `choose_num_particles` otherwise.
    """
    check_key(key)
    check_numpyro_model(model, "model")
    _check_params(params)
    if not 0.0 <= float(correlation) < 1.0:
        raise ValueError(f"correlation must lie in [0, 1); got {correlation!r}.")
    if target_sd is None:
        target_sd = PMMH_TARGET_SD if correlation == 0.0 else 1.0
    model_kwargs = {} if model_kwargs is None else model_kwargs

    log_likelihood_at = _pmmh_log_likelihood(
        model, model_args, model_kwargs, params, num_particles_argument, correlation
    )
    return _num_particles_rule(key, log_likelihood_at, target_sd, initial, max_particles, num_keys)


def _pmmh_log_likelihood(
    model: Callable,
    model_args: tuple,
    model_kwargs: dict[str, Any],
    params: dict[str, Any],
    num_particles_argument: str,
    correlation: float,
) -> Callable[[int], Callable[[PRNGKey], Array]]:
    """`N -> (key -> what the accept step sees)` of `choose_pmmh_num_particles` (see there)."""

    def log_likelihood_at(num_particles: int) -> Callable[[PRNGKey], Array]:
        kwargs = {**model_kwargs, num_particles_argument: num_particles}

        def estimate(key, noise):
            _, trace = log_density(
                handlers.seed(model, key), model_args, kwargs, {**params, **noise}
            )
            _check_statics(trace, params)
            sites = [site for site in trace.values() if site["type"] == "sample"]
            noise_sites = {s["name"]: s["value"] for s in sites if s["infer"].get(NOISE_FLAG)}
            log_likelihood = sum(
                (site["fn"].log_prob(site["value"]).sum() for site in sites if site["is_observed"]),
                0.0,
            )
            return log_likelihood, noise_sites

        def one(key):
            first_key, move_key, second_key = jax.random.split(key, 3)
            log_likelihood, noise = estimate(first_key, {})
            if correlation == 0.0:
                return log_likelihood
            if not noise:
                raise ValueError(
                    "a correlated rule needs the filter's noise as latent sites: build the "
                    "model's particle_factor with noise='sampled'."
                )
            moved = {
                name: correlation * value
                + math.sqrt(1.0 - correlation**2) * jax.random.normal(move_key, value.shape)
                for name, value in noise.items()
            }
            return estimate(second_key, moved)[0] - log_likelihood

        return one

    return log_likelihood_at


def _check_params(params: object) -> None:
    if not isinstance(params, dict):
        raise TypeError(
            "params must be a dict {site name: value} of the static sites' values, got "
            f"{type(params).__name__}."
        )


def _check_statics(trace: dict, params: dict) -> None:
    """A static site left out of `params` would be drawn afresh per key: refuse it."""
    missing = [
        name
        for name, site in trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get(NOISE_FLAG)
        and name not in params
    ]
    if missing:
        raise ValueError(
            f"params has no value for the static sites {missing}: give every sample site "
            "that is not marginalised or the filter's noise (the statics) a value, e.g. a "
            "pilot fit's posterior mean."
        )
