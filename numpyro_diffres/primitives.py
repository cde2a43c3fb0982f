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
* With `noise="sampled"` the noise $u$ is a latent site `{name}_noise` of standard normals
  (sized by `noise.noise_shape`) that the sampler moves with $\\theta$: pseudo-marginal MCMC
  on $p(\\theta)\\,N(u; 0, I)\\,\\hat p_N(y \\mid \\theta, u)$, the filter being
  `noise.noise_filter` with the noise-driven form of the factor's resampler
  (`resampling.noise_driven`). With `resampler=None` or `systematic()` that is sorted
  systematic resampling, an unbiased estimate ($N \\cdot$ state size $\\cdot T + (T - 1)$
  normals), which `infer.PMMH` / `infer.CorrelatedPMMH` sample exactly; None means this here,
  not the diffusion default, because an unbiased estimate is what those kernels need (and
  existing `noise="sampled"` models keep their meaning). That estimate is piecewise constant
  in $(\\theta, u)$: not for NUTS.
* With `noise="sampled"` and `resampler=diffusion(...)` the resampler's start (and SDE step
  noises) come from $u$ too ($N \\cdot$ state size more normals per later step, times
  $K + 1$ for the SDE), so the estimate is smooth in $(\\theta, u)$ and `MCMC(NUTS(model))`
  samples both: pseudo-marginal HMC (Alenlöv, Doucet and Lindsten, JMLR 2021), with NUTS's
  leapfrog in place of their split integrator (the target is the same). Diffusion resampling
  is not unbiased, so the $\\theta$-marginal carries a bias that shrinks as $N$ grows
  (`benchmarks/pm_hmc_bias.py` measures it), and the PMMH kernels refuse it.
* Under `SVI` the seed handler hands a fresh key at each step: stochastic gradients of the
  particle ELBO surrogate.
* Without a seed handler (e.g. `numpyro.infer.log_likelihood`, which `az.from_numpyro` calls)
  there is no key: a fixed default key is used, so the call never fails.

Many series: inside `numpyro.plate("series", S)` (parameters drawn there have shape `(S,)`)
`particle_factor` takes observations `(S, T, ...)` and runs the $S$ independent filters as
one batched filter (one trace, one compilation), each series with its own noise from the one
key; the factor then has shape `(S, T)`.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.typing import DTypeLike
from numpyro.distributions.distribution import Unit

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_count, check_key, check_name
from numpyro_diffres.filtering import FilterResult, particle_filter
from numpyro_diffres.infer.sites import FILTER_INFO, NOISE_FLAG
from numpyro_diffres.noise import noise_filter, noise_shape, unflatten_noise
from numpyro_diffres.resampling import Resampler, noise_driven
from numpyro_diffres.smoothing import forecast, particle_smoother
from numpyro_diffres.ssm import StateSpaceModel, simulate

__all__ = ["particle_factor", "sample_latent_paths", "sample_trajectory"]

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
    series_sharding: jax.sharding.NamedSharding | None = None,
    checkpoint: bool | None = None,
    noise: str | None = None,
) -> FilterResult:
    """Add a particle-filter log-likelihood to the enclosing NumPyro model.

    Registers `numpyro.factor(name, increments)` with the per-time increments of shape `(T,)`,
    so the model's log density gains the estimate of $\\log p(y_{0:T-1} \\mid \\theta)$ and
    ArviZ gets a time-indexed `log_likelihood` group (for `az.loo` / `az.waic` over time steps).

    Many series: inside `numpyro.plate("series", S)` (or nested plates of shape $B$, laid out
    by their `dim`s) one batched filter runs every series, as `particle_filter` with
    `batch_shape` $B$: `observations` are `(*B, T, ...)` and the factor `(*B, T)`, per-series,
    per-time terms for `log_likelihood` and ArviZ (the plates do not broadcast it).

    Args:
        name: site name of the factor; must be unique in the model.
        model: the state-space model, typically built from the NumPyro model's sampled parameters.
        observations: `(T, *observation_shape)`; NaN rows are missing.
        num_particles: $N$.
        resampler: default `resampling.diffusion()` (differentiable; index resamplers make
            the fixed-key surface piecewise constant, which NUTS cannot sample).
        key: optional explicit PRNG key; else `numpyro.prng_key()` (fresh per SVI step, fixed
            under NUTS: see the module docstring); else, with no seed handler, `PRNGKey(0)`.
        ess_threshold: see `particle_filter`; keep 1.0 under NUTS.
        record: also record `{name}_filtered_mean`, `{name}_filtered_variance` and
            `{name}_ess` as `numpyro.deterministic` sites.
        particle_sharding: sharding of the particle axis; see `particle_filter`.
        dtype: floating dtype of the particles (float32 under float64 NUTS); see `particle_filter`.
        series_sharding: sharding of the series axis (inside a plate); see `particle_filter`.
        checkpoint: recompute each step in the reverse pass; see `particle_filter`.
        noise: None (the filter draws its randomness from the key), or `"sampled"`: every
            random number of the filter becomes one latent site `{name}_noise` of standard
            normals $u$ driving `noise.noise_filter` with the noise-driven `resampler` (None:
            sorted systematic, unbiased, for `infer.PMMH`; `diffusion(...)`: smooth in $u$,
            for NUTS on $(\\theta, u)$); see the module docstring.

    Returns:
        The `FilterResult`, for further use in the model (series-first inside a plate).

    Raises:
        TypeError: `name` is not a string, `key` is not a PRNG key, or `resampler` is not
            callable.
        ValueError: observations that do not fit the emission or the enclosing plates, a
            subsampled plate, bad `num_particles`, a resampler with no noise-driven form.
    """
    check_name(name)
    plates = _enclosing_plates()
    batch_shape = _plate_shape(name, plates, observations)
    if noise is not None:
        result, resampler = _noise_driven_filter(
            name, model, observations, num_particles, resampler, noise, batch_shape, plates
        )
    else:
        result = particle_filter(
            _resolve_key(key),
            model,
            observations,
            num_particles=num_particles,
            resampler=resampler,
            ess_threshold=ess_threshold,
            particle_sharding=particle_sharding,
            dtype=dtype,
            batch_shape=batch_shape,
            series_sharding=series_sharding,
            checkpoint=checkpoint,
        )
    return _register(name, result, resampler, plates, record)


def _register(name, result, resampler, plates, record) -> FilterResult:
    """The factor site (and recorded summaries) of a filter's result."""
    # `numpyro.factor`'s site, plus what pseudo-marginal kernels must know of the estimate.
    # Index resampling (sorted systematic on explicit noise too) keeps the estimate unbiased;
    # moving particles (diffusion, OT, Gumbel) or reweighting them (soft) does not.
    unbiased = bool(getattr(resampler, "has_ancestors", False)) and not getattr(
        resampler, "reweights", False
    )
    info = {
        "unbiased": unbiased,
        "resampler": "diffusion() (the default)" if resampler is None else repr(resampler),
    }
    infer = {"is_auxiliary": True, FILTER_INFO: info}
    if plates:
        # The increments are laid out (*series, T); the plates must not broadcast them
        # against their own dims (NumPyro's `block_plates`, as in its reparametrisers).
        infer["block_plates"] = [plate.name for plate in plates]
    unit = Unit(result.log_likelihood_increments)
    numpyro.sample(name, unit, obs=unit.sample(None), infer=infer)
    if record:
        numpyro.deterministic(f"{name}_filtered_mean", result.filtered_mean)
        numpyro.deterministic(f"{name}_filtered_variance", result.filtered_variance)
        numpyro.deterministic(f"{name}_ess", result.ess)
    return result


def _noise_driven_filter(
    name, model, observations, num_particles, resampler, noise, batch_shape, plates
) -> FilterResult:
    """`noise.noise_filter` on a `{name}_noise` latent site; the result and its resampler."""
    if noise != "sampled":
        raise ValueError(f"noise must be None or 'sampled'; got {noise!r}.")
    resampler = noise_driven(resampler)
    num_particles = check_count("num_particles", num_particles, minimum=2)
    observations = jnp.asarray(observations)
    num_batch = len(batch_shape)
    num_steps = observations.shape[num_batch] if observations.ndim > num_batch else 0
    if num_steps < 1:
        raise ValueError(
            f"observations must have a time axis with T >= 1; got {observations.shape}."
        )
    info = model.check(observations.shape[num_batch + 1 :], batch_shape=batch_shape)
    shapes = noise_shape(
        num_steps, num_particles, info.state_shape, batch_shape, resampler=resampler
    )
    size = sum(math.prod(shape) for shape in shapes)
    flat = numpyro.sample(
        f"{name}_noise",
        dist.Normal(jnp.zeros(size), 1.0).to_event(1),
        infer={NOISE_FLAG: True, "block_plates": [plate.name for plate in plates]},
    )
    noise = unflatten_noise(flat, shapes)
    result = noise_filter(noise, model, observations, resampler=resampler, batch_shape=batch_shape)
    return result, resampler


def _enclosing_plates() -> list[numpyro.plate]:
    """The `numpyro.plate`s around the current call, outermost first."""
    from numpyro.primitives import _PYRO_STACK  # NumPyro's handler stack; read only.

    return [handler for handler in _PYRO_STACK if isinstance(handler, numpyro.plate)]


def _plate_shape(name: str, plates: list[numpyro.plate], observations: Array) -> tuple[int, ...]:
    """The series shape the plates give (as NumPyro lays out their dims); checks the data."""
    if not plates:
        return ()
    described = ", ".join(
        f"numpyro.plate({plate.name!r}, {plate.size}, dim={plate.dim})" for plate in plates
    )
    subsampled = [plate.name for plate in plates if plate.subsample_size != plate.size]
    if subsampled:
        raise ValueError(
            f"particle_factor({name!r}) is inside the subsampled plate(s) {subsampled}: "
            "subsampling series is not supported; use the full plate (subsample_size=None)."
        )
    shape = [1] * max(-plate.dim for plate in plates)
    for plate in plates:
        shape[plate.dim] = plate.size
    shape = tuple(shape)
    observed = tuple(getattr(observations, "shape", ()))
    over_time = (
        "If a plate is over time, call particle_factor outside it: the filter runs over "
        "time itself; the plate belongs over series."
    )
    if observed[: len(shape)] != shape or len(observed) < len(shape) + 1:
        raise ValueError(
            f"particle_factor({name!r}) is inside {described}, so it runs one filter per "
            f"series and observations must have shape "
            f"({', '.join(str(size) for size in shape)}, T, *observation_shape) "
            f"(the series axes as the plates lay them out, then time); got {observed}. "
            f"Make the plate size match the number of series in the data. {over_time}"
        )
    if observed[len(shape)] == 1:
        raise ValueError(
            f"particle_factor({name!r}) is inside {described} and observations {observed} "
            f"give every series a single time step. {over_time}"
        )
    return shape


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


def sample_latent_paths(
    name: str,
    model: StateSpaceModel,
    observations: Array,
    *,
    num_particles: int,
    num_paths: int = 1,
    num_steps_ahead: int = 0,
    key: PRNGKey | None = None,
    method: str = "backward",
    resampler: Resampler | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Record smoothed latent paths (and forecasts) as deterministic sites.

    Records `{name}_states`, drawn by `smoothing.particle_smoother`, and with
    `num_steps_ahead = H > 0` also `{name}_forecast` (states) and
    `{name}_forecast_observations`, drawn by `smoothing.forecast`. Shapes: `(T, *state_shape)`
    and `(H, ...)` when `num_paths == 1` (the default), else with a leading `num_paths` axis.
    Under `Predictive(model, posterior_samples)` each posterior draw gets a fresh key from the
    seed handler, so the recorded paths are draws from the posterior of the hidden path
    integrated over the parameters, $p(x_{0:T-1} \\mid y)$, and of the forecast.

    These sites add nothing to the log density, but NumPyro's MCMC replays the model once per
    kept draw whenever it has deterministic sites (to record them), with one fixed key. Switch
    them on only for `Predictive`, e.g. with a model argument:

        def model(y, predict=False):
            ...
            ndr.particle_factor("y", ssm, y, num_particles=64)
            if predict:
                ndr.sample_latent_paths("x", ssm, y, num_particles=256, num_steps_ahead=10)

        Predictive(model, mcmc.get_samples())(key, y, predict=True)

    The potential that NUTS differentiates is the same with or without the sites (XLA drops
    the unused smoother from the compiled potential).

    Args:
        name: prefix of the site names.
        model: the state-space model, built from the sampled parameters.
        observations: `(T, *observation_shape)`; NaN rows are missing.
        num_particles: $N$ of the smoother's forward filter (index resampling; see
            `particle_smoother`).
        num_paths: paths per call (per posterior draw under `Predictive`).
        num_steps_ahead: forecast horizon $H$; 0 records no forecast.
        key: optional explicit key (default: the seed handler's, else a fixed key).
        method: `"backward"` (FFBSi) or `"genealogy"`.
        resampler: index resampler of the forward filter (default systematic).
        dtype: optional floating dtype of the states.

    Returns:
        `(states, forecast_states, forecast_observations)`; the last two are None when
        `num_steps_ahead == 0`.

    Raises:
        TypeError: `name` is not a string, `key` is not a PRNG key, a count is not an int.
        ValueError: a count below its minimum (`num_steps_ahead` below 0), an unknown
            `method`, observations that do not fit the emission.
    """
    check_name(name)
    num_paths = check_count("num_paths", num_paths, minimum=1)
    num_steps_ahead = check_count("num_steps_ahead", num_steps_ahead, minimum=0)
    smoother_key, forecast_key = jax.random.split(_resolve_key(key))
    settings = dict(
        num_particles=num_particles, num_paths=num_paths, resampler=resampler, dtype=dtype
    )
    states = particle_smoother(smoother_key, model, observations, method=method, **settings)
    states = _squeeze(states, num_paths)
    numpyro.deterministic(f"{name}_states", states)
    if num_steps_ahead == 0:
        return states, None, None
    future, emitted = forecast(forecast_key, model, observations, num_steps_ahead, **settings)
    future, emitted = _squeeze(future, num_paths), _squeeze(emitted, num_paths)
    numpyro.deterministic(f"{name}_forecast", future)
    numpyro.deterministic(f"{name}_forecast_observations", emitted)
    return states, future, emitted


def _squeeze(values: Array, num_paths: int) -> Array:
    """Drop the leading paths axis when one path was drawn."""
    return values[0] if num_paths == 1 else values
