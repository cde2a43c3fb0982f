"""The scan body of a `marginalize`d model, run for one particle under its own handlers.

`Body` runs the body at one step with a particle's key, carry and the step's `xs` (the
filter's move and weight), or with its latent sites fixed (the smoother's transition density);
`BodyKernel` makes it the particle filter's kernel, reading the scan's `xs` from the filter's
step inputs (`step_covariates`); `prefix_sampler` draws the initial state from the model's
code before the scan.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro import handlers

from numpyro_diffres._log_density import safe_log_prob
from numpyro_diffres._marginal_probe import SkipScan
from numpyro_diffres._marginal_sites import (
    IndexedCondition,
    KeyedSites,
    cast_like,
    discrete_message,
    is_deterministic,
    is_floating,
    is_latent,
    is_observed,
    observed_log_prob,
)

__all__ = ["Body", "BodyInfo", "BodyKernel", "prefix_sampler", "step_covariates", "step_slice"]


class BodyInfo(NamedTuple):
    first_observed: str
    observed_names: tuple[str, ...]
    output_shape: Any
    latent_shapes: dict[str, jax.ShapeDtypeStruct]
    deterministic_shapes: dict[str, jax.ShapeDtypeStruct]


class Body:
    """The scan body run for one particle at one step, under its own handlers.

    Each run takes the scan's step `index` (for conditioned per-step values) and that step's
    slice `x` of the scan's `xs`.
    """

    def __init__(self, f, length, conditions, moves_particles):
        self.f = f
        self.length = length
        self.conditions = conditions
        self.moves_particles = moves_particles

    def _run(self, key, carry, index, x, values=None):
        """Run the body once; `values` fixes latent sites (no draw for them)."""
        with handlers.block(), handlers.trace() as body_trace, KeyedSites(key):
            with (
                IndexedCondition(self.conditions, index, self.length),
                handlers.substitute(data=values or {}),
            ):
                new_carry, output = self.f(carry, x)
        return new_carry, output, body_trace

    def inspect(self, carry_shape, x) -> BodyInfo:
        """Trace the body once on abstract values (`x`: a step of `xs`) and check it."""
        found = {}

        def trace_once(carry):
            key = jax.random.PRNGKey(0)
            new_carry, output, body_trace = self._run(key, carry, jnp.int32(0), x)
            found["trace"] = body_trace
            for kind, keep in (
                ("latent_shapes", is_latent),
                ("deterministic_shapes", is_deterministic),
            ):
                found[kind] = {
                    site["name"]: jax.ShapeDtypeStruct(
                        jnp.shape(site["value"]), site["value"].dtype
                    )
                    for site in body_trace.values()
                    if keep(site)
                }
            return new_carry, output

        new_shape, output_shape = jax.eval_shape(trace_once, carry_shape)
        body_trace = found["trace"]
        latent = [site for site in body_trace.values() if is_latent(site)]
        observed = [site for site in body_trace.values() if is_observed(site)]
        if not latent:
            raise ValueError(
                "the scan body has no latent sample sites: there is nothing to marginalise; "
                "drop marginalize, or move the latent states into the scan body."
            )
        for site in latent:
            if site["fn"].support.is_discrete and self.moves_particles:
                raise ValueError(discrete_message(site["name"]))
        for site in body_trace.values():
            if site["type"] == "sample" and (site.get("mask") is not None):
                raise ValueError(
                    f"site {site['name']!r} is masked inside the scan body; marginalize "
                    "does not support handlers.mask there: mark missing values with NaN."
                )
        if not observed:
            raise ValueError(
                "the scan body has no observed sites: the particle filter would have no "
                "likelihood to estimate."
            )
        old = [(s.shape, s.dtype) for s in jax.tree.leaves(carry_shape)]
        new = [(s.shape, s.dtype) for s in jax.tree.leaves(new_shape)]
        if jax.tree.structure(carry_shape) != jax.tree.structure(new_shape) or [
            shape for shape, _ in old
        ] != [shape for shape, _ in new]:
            raise ValueError(
                "the latent state changes shape over time: the scan's initial carry has "
                f"shapes {[shape for shape, _ in old]} and the body returns "
                f"{[shape for shape, _ in new]}. Draw x_0 with the shape of later states."
            )
        return BodyInfo(
            observed[0]["name"],
            tuple(site["name"] for site in observed),
            output_shape,
            found["latent_shapes"],
            found["deterministic_shapes"],
        )

    def step(self, key, carry, index, x, record=False):
        """`(new particle vector, log_correction, log_likelihood)` for one particle.

        With `record`, the values of the latent and of the deterministic sites (two dicts) are
        appended as a fourth and fifth output.
        """
        new_carry, _, body_trace = self._run(key, carry, index, x)
        new_carry = cast_like(new_carry, carry)
        flat, _ = ravel_pytree(new_carry)
        log_likelihood = jnp.zeros((), jnp.result_type(float))
        for site in body_trace.values():
            if is_observed(site):
                log_likelihood = log_likelihood + observed_log_prob(site)
        log_correction = jnp.zeros((), log_likelihood.dtype)
        if is_floating(flat):
            finite = jnp.all(jnp.isfinite(flat))
            # An overflowing state (e.g. invalid parameters) is an impossible particle, not a
            # NaN poisoning the cloud.
            flat = jnp.where(finite, flat, jnp.zeros_like(flat))
            log_correction = jnp.where(finite, log_correction, -jnp.inf)
        if record:
            sites = body_trace.values()
            latent = {site["name"]: site["value"] for site in sites if is_latent(site)}
            recorded = {site["name"]: site["value"] for site in sites if is_deterministic(site)}
            return flat, log_correction, log_likelihood, latent, recorded
        return flat, log_correction, log_likelihood

    def log_density(self, carry, index, x, values):
        """`(new carry vector, log p(latent sites = values, observed sites | carry))`."""
        new_carry, _, body_trace = self._run(jax.random.PRNGKey(0), carry, index, x, values)
        new_carry = cast_like(new_carry, carry)
        log_density = jnp.zeros((), jnp.result_type(float))
        for site in body_trace.values():
            if is_latent(site):
                log_density = log_density + jnp.sum(safe_log_prob(site["fn"], site["value"]))
            elif is_observed(site):
                log_density = log_density + observed_log_prob(site)
        return ravel_pytree(new_carry)[0], log_density


class BodyKernel:
    """The filter's kernel: particles are flattened carries, moved by the scan body.

    Step $t$ runs the body at scan step $t - $ `offset` on `inputs.covariates`, the rows of
    `step_covariates`.

    Args:
        body: the `Body`.
        init: the scan's initial carry (the form with $x_0$ drawn in the body).
        draw_first: `prefix_sampler`'s draw (the form with $x_0$ before the scan), or None.
        unravel: flat particle -> carry pytree.
    """

    def __init__(self, body, init, draw_first, unravel):
        self.body = body
        self.init = init
        self.draw_first = draw_first
        self.unravel = unravel
        self.offset = 0 if draw_first is None else 1

    def initialize(self, key, num_particles, inputs):
        """Initial particles `(N, d)` and unnormalised log-weights `(N,)`."""
        if self.draw_first is not None:
            carries, log_weights = self.draw_first(key, num_particles)
            particles = jax.vmap(lambda c: ravel_pytree(c)[0])(carries)
        else:
            keys = jax.random.split(key, num_particles)
            particles, log_correction, log_likelihood = jax.vmap(
                lambda k: self.body.step(k, self.init, jnp.int32(0), inputs.covariates)
            )(keys)
            log_weights = log_correction + log_likelihood
        return particles, log_weights

    def propagate(self, key, particle, inputs):
        """One particle through the body at step `inputs.time`."""
        index = inputs.time - self.offset
        return self.body.step(key, self.unravel(particle), index, inputs.covariates)


def step_slice(xs, index):
    """The scan's `xs` at scan step `index` (None for `xs=None`)."""
    return jax.tree.map(lambda a: jnp.take(jnp.asarray(a), index, axis=0), xs)


def step_covariates(xs, offset):
    """The scan's `xs` as the filter's per-step covariates, one row per filter step.

    With the initial state drawn before the scan (`offset` 1) the filter's step 0 runs no
    body: a row of zeros stands in for it, and filter step $t$ gets `xs[t - 1]`.
    """

    def rows(a):
        a = jnp.asarray(a)
        if not offset:
            return a
        return jnp.concatenate([jnp.zeros((offset, *a.shape[1:]), a.dtype), a])

    return jax.tree.map(rows, xs)


def prefix_sampler(model, args, kwargs, statics, initial, prefix_observed):
    """`draw(key, N) -> (initial carries, log-weights)` from the model's code before the scan.

    Args:
        model: the wrapped model, re-run per particle up to its scan.
        args: its positional arguments.
        kwargs: its keyword arguments.
        statics: values of the static sites before the scan (kept fixed).
        initial: the messages of the initial sites (drawn per particle).
        prefix_observed: names of the observed sites before the scan that depend on them.
    """
    statics = dict(statics)
    initial = list(initial)

    def run(key, values):
        """One particle: `(initial carry, log-weight)`; `values` fixes initial sites."""
        # The scan is answered with placeholders and the model runs to its end: an
        # exception stopping it at the scan would leave NumPyro's handler stack broken,
        # as the model's own wrappers (e.g. `marginalize(condition(model, ...))`) are
        # entered a second time here and pop the stack from their first entry on error.
        stopper = SkipScan()
        with (
            handlers.block(),
            handlers.trace() as prefix_trace,
            handlers.substitute(data={**statics, **values}),
            KeyedSites(key),
            stopper,
        ):
            model(*args, **kwargs)
        log_weight = jnp.zeros((), jnp.result_type(float))
        for site_name in prefix_observed:
            log_weight = log_weight + observed_log_prob(prefix_trace[site_name])
        for site in initial:
            value = prefix_trace[site["name"]]["value"]
            if is_floating(value):
                finite = jnp.all(jnp.isfinite(value))
                log_weight = jnp.where(finite, log_weight, -jnp.inf)
        values = {site["name"]: prefix_trace[site["name"]]["value"] for site in initial}
        return stopper.init, log_weight, values

    def draw(key, num_particles, record=False):
        """Initial carries and log-weights (and, with `record`, the initial sites)."""
        if len(initial) == 1:
            # One initial site: drawn as a StateSpaceModel's initial distribution is, so
            # the same key gives the same cloud.
            site = initial[0]
            shape = (num_particles, *site["kwargs"]["sample_shape"])
            values = site["fn"].sample(key, shape)
            drawn = jax.vmap(lambda v: run(key, {site["name"]: v}))(values)
        else:
            keys = jax.random.split(key, num_particles)
            drawn = jax.vmap(lambda k: run(k, {}))(keys)
        return drawn if record else drawn[:2]

    return draw
