"""Smoothed latent paths of a `marginalize`d scan (FFBSi or ancestor tracing)."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from numpyro_diffres._marginal_body import step_slice
from numpyro_diffres._marginal_sites import is_floating
from numpyro_diffres._typing import Array
from numpyro_diffres.resampling import systematic
from numpyro_diffres.smoothing import draw_paths

__all__ = ["PathStart", "smoothed_sites"]


class PathStart(NamedTuple):
    """How the filter starts: a fixed carry, or a draw of the sites before the scan."""

    init: Any
    draw_first: Callable | None
    initial_values: dict[str, Array]
    carry_shape: Any


def smoothed_sites(key, body, info, start, num_steps, covariates, num_particles, method) -> dict:
    """One smoothed draw of the latent sites, `{name: value}` with NUTS's shapes.

    `covariates` are the filter's per-step rows of the scan's `xs` (`step_covariates`).

    A forward filter with systematic resampling stores, per particle and step, the carry and
    the latent sites' values (the initial sites at $t = 0$ in the form that draws them before
    the scan). FFBSi then needs the density of step $t + 1$ given a particle at $t$: the body
    is re-run on that particle's carry with the latent sites fixed to the following values,
    and the carry it returns must equal the following carry (the carry is a function of the
    previous one and the sites, so the transition of (carry, sites) has a point mass there).
    When the carry is the latent site itself (the common case) every particle qualifies and
    this is FFBSi on the latent states; when it also depends on the previous carry only the
    ancestor qualifies and the draw follows the genealogy.
    """
    offset = 1 if start.draw_first is not None else 0
    carry_template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), start.carry_shape)
    flat_carry, unravel_carry = ravel_pytree(carry_template)
    no_sites = {name: jnp.zeros(s.shape, s.dtype) for name, s in info.latent_shapes.items()}
    none_recorded = {
        name: jnp.zeros(s.shape, s.dtype) for name, s in info.deterministic_shapes.items()
    }
    no_initial = {name: jnp.zeros_like(value) for name, value in start.initial_values.items()}
    _, unravel = ravel_pytree(
        {"carry": flat_carry, "initial": no_initial, "sites": no_sites, "recorded": none_recorded}
    )

    def pack(carry, initial, sites, recorded):
        parts = {"carry": carry, "initial": initial, "sites": sites, "recorded": recorded}
        return ravel_pytree(parts)[0]

    class Kernel:
        def initialize(self, key, num_particles, inputs):
            if start.draw_first is not None:
                carries, log_weights, initial = start.draw_first(key, num_particles, record=True)
                carries = jax.vmap(lambda c: ravel_pytree(c)[0])(carries)
                sites, recorded = jax.tree.map(
                    lambda z: jnp.broadcast_to(z, (num_particles, *z.shape)),
                    (no_sites, none_recorded),
                )
            else:
                keys = jax.random.split(key, num_particles)
                carries, log_correction, log_likelihood, sites, recorded = jax.vmap(
                    lambda k: body.step(k, start.init, jnp.int32(0), inputs.covariates, record=True)
                )(keys)
                log_weights = log_correction + log_likelihood
                initial = no_initial
            particles = jax.vmap(pack, in_axes=(0, 0 if offset else None, 0, 0))(
                carries, initial, sites, recorded
            )
            return particles, log_weights

        def propagate(self, key, particle, inputs):
            carry = unravel_carry(unravel(particle)["carry"])
            new, log_correction, log_likelihood, sites, recorded = body.step(
                key, carry, inputs.time - offset, inputs.covariates, record=True
            )
            return pack(new, no_initial, sites, recorded), log_correction, log_likelihood

    def log_transition(particle, following, t):
        current, following = unravel(particle), unravel(following)
        carry, log_density = body.log_density(
            unravel_carry(current["carry"]),
            t + 1 - offset,
            step_slice(covariates, t + 1),
            following["sites"],
        )
        possible = _same_carry(carry, following["carry"]) & jnp.isfinite(log_density)
        return jnp.where(possible, log_density, -jnp.inf)

    observations = jnp.zeros((num_steps,), flat_carry.dtype)
    paths = _draw_path(
        key, Kernel(), log_transition, observations, covariates, num_particles, method
    )
    path = jax.vmap(unravel)(paths)
    values = {name: value[0] for name, value in path["initial"].items()}
    for part in ("sites", "recorded"):
        values.update({name: value[offset:] for name, value in path[part].items()})
    return values


def _same_carry(carry, target):
    """Whether the re-run carry equals the stored one (to rounding for floating carries)."""
    if is_floating(target):
        tolerance = 1e3 * float(jnp.finfo(target.dtype).eps)
        return jnp.all(jnp.abs(carry - target) <= tolerance * (1.0 + jnp.abs(target)))
    return jnp.all(carry == target)


def _draw_path(key, kernel, log_transition, observations, covariates, num_particles, method):
    """One smoothed path of flat particles `(T, d)`, NaN where no path was possible."""
    return draw_paths(
        key,
        kernel,
        observations,
        num_particles=num_particles,
        resampler=systematic(),
        num_paths=1,
        log_transition=log_transition,
        method=method,
        covariates=covariates,
    )[0]
