"""Particle marginal Metropolis-Hastings (PMMH) as NumPyro MCMC kernels.

Andrieu, Doucet and Holenstein (2010), "Particle Markov chain Monte Carlo methods", JRSSB 72;
the correlated variant is Deligiannidis, Doucet and Pitt (2018), "The correlated
pseudo-marginal method", JRSSB 80.

A random walk on the model's unconstrained latent sites (the statics $\\theta$) that accepts
with the ratio of two particle estimates of the likelihood:

$$\\alpha = \\min\\Big(1, \\frac{p(\\theta')\\, \\hat p(y \\mid \\theta', u')}
{p(\\theta)\\, \\hat p(y \\mid \\theta, u)}\\Big).$$

The estimate at the current point is kept in the state with the point and never recomputed;
then the chain targets $p(\\theta)\\, N(u; 0, I)\\, \\hat p(y \\mid \\theta, u)$, whose
$\\theta$-marginal is the exact posterior $p(\\theta \\mid y)$ for any number of particles
whenever $\\hat p$ is unbiased (index resampling: `systematic()`, `stratified()`,
`multinomial()`). The filter's randomness $u$ comes from one of two places:

* a `particle_factor` without `noise`: the kernel seeds the model with a fresh key at every
  proposal, so every proposal gets an independent estimate (plain PMMH);
* a `particle_factor(..., noise="sampled")`: the noise is a latent site of standard normals,
  which the kernel moves by Crank-Nicolson, $u' = \\rho u + \\sqrt{1 - \\rho^2}\\,
  \\varepsilon$. With $\\rho = 0$ this is plain PMMH again; with $\\rho$ near 1 (the
  correlated kernel) the estimates at the current and proposed points are strongly
  correlated, so the log-likelihood *ratio* has a small variance even when each estimate is
  noisy, and far fewer particles give the same efficiency.

The random walk's covariance is learnt during warm-up by robust adaptive Metropolis
(`adaptation.robust_adaptive_update`), coerced to `target_accept_prob`; for a pseudo-marginal
chain the best acceptance rate is lower than the 0.234 of an exact random walk (Sherlock,
Thiery, Roberts and Rosenthal 2015 put it near 0.07 in high dimension, where the
log-likelihood estimate's standard deviation is about 1.2-1.8).
"""

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.mcmc import MCMCKernel
from numpyro.infer.util import (
    constrain_fn,
    potential_energy,
    transform_fn,
)
from numpyro.util import is_prng_key

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.infer.adaptation import robust_adaptive_update
from numpyro_diffres.infer.sites import ModelSites, inspect_sites

__all__ = ["PMMH", "CorrelatedPMMH", "PMMHState"]


class PMMHState(NamedTuple):
    """The state of a PMMH chain.

    Attributes:
        z: unconstrained values of every latent site (the statics and any noise sites), a
            dict from site name to array.
        potential_energy: $-\\log$ of the model's joint density at `z` with the likelihood
            estimate stored with it (prior, Jacobians, noise prior and estimate).
        log_likelihood: the stored estimate $\\log \\hat p(y \\mid \\theta, u)$: the sum of
            the model's observed and factor sites at `z`. Its spread across draws shows how
            noisy the estimator is (collected by default: `mcmc.get_extra_fields()`).
        accept_prob: this step's acceptance probability.
        mean_accept_prob: running mean of `accept_prob` within the current phase (warm-up,
            then sampling).
        i: the step's number.
        scale_tril: the random walk's lower-triangular factor over the flattened statics.
        rng_key: the chain's key.
    """

    z: dict
    potential_energy: Array
    log_likelihood: Array
    accept_prob: Array
    mean_accept_prob: Array
    i: Array
    scale_tril: Array
    rng_key: PRNGKey


class PMMH(MCMCKernel):
    """Particle marginal Metropolis-Hastings on a NumPyro model.

    Use as `MCMC(ndr.infer.PMMH(model), num_warmup=..., num_samples=...)` on a model whose
    likelihood comes from `particle_factor` sites (one or several, inside plates too) with an
    unbiased resampler, e.g. `resampler=ndr.resampling.systematic()`, or from ordinary
    observed sites. All chain methods work, `chain_method="vectorized"` included (the fastest
    on one device: every chain's filter runs as one batched computation).

    Args:
        model: the NumPyro model.
        step_size: initial standard deviation of the random walk in the unconstrained space
            (scalar), before warm-up adapts it.
        target_accept_prob: the acceptance rate warm-up coerces.
        adapt: whether warm-up adapts the random walk (robust adaptive Metropolis).
        correlation: $\\rho \\in [0, 1)$ of the Crank-Nicolson move of noise sites
            (`particle_factor(..., noise="sampled")`); 0 draws them afresh.
        init_strategy: NumPyro initialisation strategy of the statics.

    Raises:
        TypeError: `model` is not callable.
        ValueError: a setting outside its range; at `init`, a model with discrete latent
            sites or a `particle_factor` whose resampler is not unbiased.
    """

    sample_field = "z"

    def __init__(
        self,
        model: Callable,
        *,
        step_size: float = 0.1,
        target_accept_prob: float = 0.15,
        adapt: bool = True,
        correlation: float = 0.0,
        init_strategy: Callable = init_to_uniform,
    ):
        if not callable(model):
            raise TypeError(f"PMMH needs a NumPyro model (a callable); got {model!r}.")
        if not (np.isscalar(step_size) and float(step_size) > 0):
            raise ValueError(f"step_size must be a positive number; got {step_size!r}.")
        if not 0.0 < float(target_accept_prob) < 1.0:
            raise ValueError(
                f"target_accept_prob must lie in (0, 1); got {target_accept_prob!r}. "
                "Pseudo-marginal chains work best near 0.07-0.25."
            )
        if not 0.0 <= float(correlation) < 1.0:
            raise ValueError(
                f"correlation must lie in [0, 1) (the Crank-Nicolson rho); got {correlation!r}."
            )
        self._model = model
        self._step_size = float(step_size)
        self._target = float(target_accept_prob)
        self._adapt = bool(adapt)
        self._correlation = float(correlation)
        self._init_strategy = init_strategy
        self._num_warmup = 0
        self._sites: ModelSites | None = None
        self._postprocess_fn = None
        self._batched = False
        self._sample_fn = None

    @property
    def model(self) -> Callable:
        """The NumPyro model."""
        return self._model

    @property
    def default_fields(self) -> tuple[str, ...]:
        """Fields collected by default: the draws and the stored estimate."""
        return ("z", "log_likelihood")

    def postprocess_fn(self, model_args, model_kwargs):
        """Map unconstrained draws to the model's constrained sites (and deterministics)."""
        if self._postprocess_fn is None:
            return lambda z: z
        return self._postprocess_fn(*model_args, **model_kwargs)

    def get_diagnostics_str(self, state: PMMHState) -> str:
        """The progress bar's text: the running acceptance rate."""
        return f"acc. prob={float(state.mean_accept_prob):.2f}"

    def init(self, rng_key, num_warmup, init_params, model_args, model_kwargs):
        """Initialise the chain(s); see `numpyro.infer.mcmc.MCMCKernel.init`.

        The initial point of every chain (NumPyro's `init_strategy`, retried until the
        potential is finite), its noise and its first likelihood estimate come from one
        compiled call: run eagerly, as `initialize_model` runs them, each particle filter in
        the model is compiled on its own and the start cost seconds more than the warm-up
        steps (measured: 4.5 s of 10.8 s for 1000 warm-up steps of the growth model).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        batched = not is_prng_key(rng_key)
        keys = rng_key if batched else rng_key[None]
        self._sites, self._prototype, transforms = self._inspect(keys[0], model_args, model_kwargs)
        self._postprocess_fn = _postprocess(self._model, transforms, self._sites)
        self._num_warmup = int(num_warmup)
        self._batched = batched
        if init_params is not None and not batched:
            init_params = jax.tree.map(lambda value: jnp.asarray(value)[None], init_params)

        def start(key, z):
            return self._start(key, z, model_args, model_kwargs)

        state, valid = jax.jit(jax.vmap(start))(keys, init_params)
        if not bool(jnp.all(valid)):
            raise RuntimeError(
                "PMMH found no initial point with a finite log-density and likelihood estimate "
                "in 100 tries: check the model's priors and data, give init_params, or use "
                "more particles (an estimate of -inf means every particle got weight zero)."
            )
        # What NumPyro's MCMC checks to know the kernel is initialised: without it, `run`
        # after `warmup` would initialise the model (and evaluate the filter) again.
        self._sample_fn = self.sample
        return state if batched else jax.tree.map(lambda leaf: leaf[0], state)

    def _start(self, key, z, model_args, model_kwargs) -> tuple[PMMHState, Array]:
        """One chain's initial state (and whether its point is valid), traced.

        Draws initial points (`init_strategy`, or `z` as given) with fresh noise until the
        potential is finite, at most 100 times: one loop, so the filter is compiled once.
        """
        search_key, chain_key = jax.random.split(key)
        if z is not None:  # given statics; noise sites the user left out are drawn below
            z = {**self._prototype, **z}

        def search(carry):
            i, key, _, _ = carry
            key, init_key, noise_key, filter_key = jax.random.split(key, 4)
            point = self._initial_point(init_key, model_args, model_kwargs) if z is None else z
            point = self._sites.draw_noise(noise_key, point)
            return i + 1, key, point, self._evaluate(filter_key, point, model_args, model_kwargs)

        def not_found(carry):
            i, _, _, (energy, _) = carry
            return (i < 100) & ~jnp.isfinite(energy)

        # The carry's first point only fixes the structure: the loop runs at least once.
        prototype = self._prototype if z is None else z
        inf = jnp.full((), jnp.inf, ravel_pytree(prototype)[0].dtype)
        start = (0, search_key, prototype, (inf, inf))
        _, _, z, (energy, log_likelihood) = jax.lax.while_loop(not_found, search, start)
        flat, _ = ravel_pytree(self._sites.statics(z))
        scale = self._step_size * jnp.eye(flat.shape[0], dtype=flat.dtype)
        zero = jnp.zeros((), flat.dtype)
        state = PMMHState(z, energy, log_likelihood, zero, zero, jnp.array(0), scale, chain_key)
        return state, jnp.isfinite(energy)

    def _initial_point(self, key: PRNGKey, model_args: tuple, model_kwargs: dict) -> dict:
        """Unconstrained values of the latent sites from `init_strategy`."""
        strategy = self._init_strategy
        strategy = strategy if isinstance(strategy, partial) else strategy()
        if strategy.func is init_to_uniform:  # needs no run of the model
            radius = strategy.keywords.get("radius", 2.0)
            keys = jax.random.split(key, len(self._prototype))
            return {
                name: jax.random.uniform(k, v.shape, v.dtype, -radius, radius)
                for k, (name, v) in zip(keys, self._prototype.items(), strict=True)
            }
        seeded = handlers.substitute(handlers.seed(self._model, key), substitute_fn=strategy)
        trace = handlers.trace(seeded).get_trace(*model_args, **model_kwargs)
        return {
            name: biject_to(trace[name]["fn"].support).inv(trace[name]["value"])
            for name in self._prototype
        }

    def sample(self, state: PMMHState, model_args, model_kwargs) -> PMMHState:
        """One proposal, one filter run, one accept/reject; adapts during warm-up.

        With several chains under `chain_method="vectorized"` the state has a leading chain
        axis and every chain steps at once.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if self._batched:
            return jax.vmap(self._step, in_axes=(0, None, None))(state, model_args, model_kwargs)
        return self._step(state, model_args, model_kwargs)

    def _step(self, state: PMMHState, model_args, model_kwargs) -> PMMHState:
        sites = self._sites
        key, walk_key, filter_key, noise_key, accept_key = jax.random.split(state.rng_key, 5)
        flat, unravel = ravel_pytree(sites.statics(state.z))
        direction = jax.random.normal(walk_key, flat.shape, flat.dtype)
        proposal = dict(unravel(flat + state.scale_tril @ direction))
        proposal.update(sites.move_noise(noise_key, state.z))
        energy, log_likelihood = self._evaluate(filter_key, proposal, model_args, model_kwargs)
        # Noise sites are moved reversibly with respect to their N(0, I) prior, so their prior
        # cancels from the ratio; the rest of the joint density is the target's.
        log_ratio = (state.potential_energy + sites.noise_log_prior(state.z)) - (
            energy + sites.noise_log_prior(proposal)
        )
        log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
        accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accepted = jnp.log(jax.random.uniform(accept_key, dtype=flat.dtype)) < log_ratio
        z = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), proposal, state.z)
        i = state.i + 1
        warmup = i <= self._num_warmup
        scale_tril = state.scale_tril
        if self._adapt and flat.shape[0] > 0:
            adapted = robust_adaptive_update(scale_tril, direction, accept_prob, i, self._target)
            scale_tril = jnp.where(warmup, adapted, scale_tril)
        # The running mean restarts when sampling begins, so it reports the sampling phase.
        phase_step = jnp.where(warmup, i, i - self._num_warmup)
        mean_accept_prob = state.mean_accept_prob + (
            accept_prob - state.mean_accept_prob
        ) / phase_step.astype(flat.dtype)
        return PMMHState(
            z,
            jnp.where(accepted, energy, state.potential_energy),
            jnp.where(accepted, log_likelihood, state.log_likelihood),
            accept_prob,
            mean_accept_prob,
            i,
            scale_tril,
            key,
        )

    def _inspect(self, key: PRNGKey, model_args: tuple, model_kwargs: dict):
        """The sites' roles, the latent sites' unconstrained prototype, and their transforms.

        Read from a trace of the model on abstract values (nothing runs), before any
        initialisation, which fails less clearly on discrete sites. The transforms are None
        where mapping draws back needs the model replayed: deterministic sites, or a support
        that depends on other values (its transform holds traced values).
        """
        found = []

        def trace_model(key):
            model = handlers.seed(self._model, key)
            trace = handlers.trace(model).get_trace(*model_args, **model_kwargs)
            found.append(inspect_sites(trace, self._correlation))
            latent = {
                name: site
                for name, site in trace.items()
                if site["type"] == "sample" and not site["is_observed"]
            }
            # Supports are built on access: bounds that depend on no draw stay concrete, so a
            # traced leaf in a transform means a support that depends on a draw.
            with jax.ensure_compile_time_eval():
                transforms = {name: biject_to(site["fn"].support) for name, site in latent.items()}
            replay = any(site["type"] == "deterministic" for site in trace.values()) or any(
                isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(transforms)
            )
            found.append(None if replay else transforms)
            return {name: transforms[name].inv(site["value"]) for name, site in latent.items()}

        shapes = jax.eval_shape(trace_model, key)
        prototype = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
        return found[0], prototype, found[1]

    def _evaluate(
        self, key: PRNGKey, z: dict, model_args: tuple, model_kwargs: dict
    ) -> tuple[Array, Array]:
        """Potential energy and likelihood estimate at `z`, the filter seeded with `key`."""
        traced = handlers.trace(handlers.seed(self._model, key))
        energy = potential_energy(traced, model_args, model_kwargs, z)
        log_likelihood = self._sites.log_likelihood(traced.trace)
        return energy, log_likelihood


class CorrelatedPMMH(PMMH):
    """Correlated pseudo-marginal Metropolis-Hastings (Deligiannidis, Doucet and Pitt 2018).

    `PMMH` with the filter's noise moved by Crank-Nicolson with `correlation` $\\rho$ near 1
    instead of drawn afresh. The model's likelihood must come from
    `particle_factor(..., noise="sampled")`, whose filter turns standard normals into the
    transition draws and, through the normal CDF, into the uniforms of systematic resampling
    over particles sorted along one axis, so nearby $(\\theta, u)$ give nearby estimates and
    the chain stays exact.

    Args:
        model: the NumPyro model.
        correlation: $\\rho$; 0.99 by default. The log-likelihood ratio's variance grows
            with $1 - \\rho$ and with $T / N$; see `diagnostics.choose_pmmh_num_particles`.
        **settings: the other `PMMH` settings.
    """

    def __init__(self, model: Callable, *, correlation: float = 0.99, **settings: Any):
        super().__init__(model, correlation=correlation, **settings)

    def init(self, rng_key, num_warmup, init_params, model_args, model_kwargs):
        """Initialise; refuses a model without noise sites."""
        state = super().init(rng_key, num_warmup, init_params, model_args, model_kwargs)
        if not self._sites.noise:
            raise ValueError(
                "CorrelatedPMMH moves the particle filter's noise, but this model has none as a "
                "latent site: build its likelihood with ndr.particle_factor(..., "
                "noise='sampled'), or use ndr.infer.PMMH for fresh noise at every proposal."
            )
        return state


def _postprocess(model: Callable, transforms: dict | None, sites: ModelSites) -> Callable:
    """NumPyro's `postprocess_fn(*args, **kwargs)`: unconstrained draws to the model's sites.

    The noise sites are left out of the draws: they are the filter's standard normals,
    `N * T` numbers a draw (0.6 GB for 12,000 draws of the growth model at N = 256), which
    nobody reads; they stay in the chain's state. With `transforms` None the model is
    replayed (seeded: a `particle_factor` without its own key draws one), so deterministic
    sites and supports that depend on other sites come out right; otherwise each site is
    mapped by its transform, as NumPyro does, which never runs the filter.
    """
    statics = sites.statics
    if transforms is not None:
        kept = statics(transforms)

        def constrain(*model_args, **model_kwargs):
            return lambda z: transform_fn(kept, statics(z))

        return constrain

    seeded = handlers.seed(model, 0)

    def replay(*model_args, **model_kwargs):
        replayed = partial(
            constrain_fn, seeded, model_args, model_kwargs, return_deterministic=True
        )
        # Compiled: NumPyro calls it once outside the sampling loop, where it would run
        # each filter op by op (6.5 s measured on stochastic volatility at T = 100).
        return jax.jit(lambda z: statics(replayed(statics(z))))

    return replay
