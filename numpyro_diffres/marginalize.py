"""Marginalise the latent states of a NumPyro `scan` program with the particle filter.

`marginalize` is a NumPyro `Messenger`. Around an unchanged model written with
`numpyro.contrib.control_flow.scan`, it replaces the latent sample sites of the scan (and the
initial state drawn before it) by a particle filter: each particle runs the scan body with its
own key, the body's sample sites without `obs` are drawn per particle, those with `obs` weight
the particle, the carry is the particle state and is resampled (default: diffusion
resampling, Andersson & Zhao, arXiv:2512.10401). The marginal log-likelihood enters the model
as one `numpyro.factor` with per-time terms, so NUTS and SVI see only the static parameters:

    ndr.marginalize(model, num_particles=64)(returns)   # e.g. MCMC(NUTS(ndr.marginalize(...)))

    with ndr.marginalize(num_particles=64):   # inside a model: x_0 drawn in the scan body
        model(returns)

Supported forms (checked at trace time; anything else raises a `ValueError` or `TypeError`
saying what to change):

* One `scan` (forward, `history=1`), no enumeration, not under a `plate`.
* The initial state either (a) drawn before the scan: the latent sites before the scan from
  which the scan's initial carry is computed (e.g. `x0 = sample("x0", ...)`,
  `scan(body, x0, y[1:])`), found from the model's computation or named with
  `initial_sites=`, with any observed sites before the scan that depend on them (e.g.
  `sample("y0", ..., obs=y[0])`); the filter then has $T = $ `length + 1` steps, the first one
  for the sites before the scan. This form needs the handler to re-run the model's code before
  the scan per particle, so it works with `marginalize(model, ...)`; in a bare `with` block
  latent sites before the scan stay ordinary sites (NUTS samples them), and the handler
  raises if the initial carry is one of them. Or (b) a fixed initial carry, with $x_0$ drawn
  inside the body at the first step (e.g. `jnp.where(t == 0, stationary, transition)` with
  `t` scanned through `xs`); then $T = $ `length`.
* In the body: any number of latent sites per step, deterministic sites, plates, covariates
  and the time index through `xs`, pytree carries (flattened to one vector per particle),
  observed sites whose value contains NaN (missing at that step: they add 0). Floating-point
  carries only under a resampler whose `moves_particles` trait is true (diffusion, optimal
  transport, Gumbel-softmax, and any wrapper of them: they move particles to new values):
  pass counters through `xs`, use an index resampler for discrete states.
* Static parameters sampled outside the scan stay ordinary sites (NUTS/SVI sample them).
  Observed sites after the scan must not depend on the scan's outputs.
* Handlers around the scan: `condition` (with `data=` or `condition_fn=`) observes body
  sites, a series of values giving one per step; `substitute(data=...)` naming a body site
  is refused (the latent path is integrated out; observe data with `condition`); a
  `substitute_fn` (as NUTS's initialisation and potential pass) sees the marginalised
  model's sites, which do not include the body's; `mask` on the sites it evaluates is
  refused (mark missing values with NaN).

The scan returns the filtered mean of the final carry, and NaN (floating) or zero
(integer) arrays for its stacked outputs `ys`: the latent path is integrated out.

Key semantics as `particle_factor`: an explicit `key` wins, else the key the seed handler
gives the scan (fixed under NUTS: the fixed-noise surrogate $p(\\theta)\\,
\\hat p_N(y \\mid \\theta; u)$, fresh per SVI step), else a fixed default key.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.ops.pytree import PytreeTrace
from numpyro.primitives import Messenger

from numpyro_diffres._marginal_body import (
    Body,
    BodyKernel,
    prefix_sampler,
    step_covariates,
    step_slice,
)
from numpyro_diffres._marginal_paths import PathStart, smoothed_sites
from numpyro_diffres._marginal_probe import Plan, probe_model
from numpyro_diffres._marginal_sites import discrete_message, is_floating
from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_count, check_fraction, check_key
from numpyro_diffres.filter_arguments import check_resampler
from numpyro_diffres.filtering import FilterResult, run_filter
from numpyro_diffres.resampling import Resampler
from numpyro_diffres.smoothing import SMOOTHING_METHODS

__all__ = ["marginalize"]

DEFAULT_SEED = 0


class marginalize(Messenger):  # noqa: N801  (a handler, named like numpyro's handlers)
    """Replace the latent sites of a `scan` by a particle filter's marginal likelihood.

    Use as `marginalize(model, num_particles=64)` (a wrapped model) or as
    `with marginalize(num_particles=64): ...`. See the module docstring for the supported
    forms. The factor site (named `name`, default: the first observed site of the scan body)
    holds the per-time log-likelihood increments, shape `(T,)`, so
    `numpyro.infer.log_likelihood` and `az.from_numpyro` get a time-indexed group.

    Args:
        fn: the model (optional; without it the handler is a context manager or decorator).
        num_particles: $N \\ge 2$.
        resampler: default `resampling.diffusion()`.
        key: optional explicit PRNG key (default: the seed handler's, else a fixed key).
        name: name of the factor site (default: the first observed site in the body).
        initial_sites: names of latent sites before the scan that form the initial state;
            default: found from the model (the latent sites the initial carry is computed
            from). Only with a wrapped `fn`.
        ess_threshold: resample when ESS < `ess_threshold * N`; keep 1.0 under NUTS.
        latent_paths: also record one smoothed draw of the latent sites, under their own
            names and with the shapes NUTS over the latents would give them (`(T, ...)` for a
            body site, the site's shape for an initial site), as deterministic sites. For
            `Predictive` after the fit (a fresh key per draw gives one path per posterior
            draw); under MCMC they would be recomputed at every draw.
        smoothing: how the paths are drawn: `"backward"` (FFBSi, default) or `"genealogy"`
            (ancestor tracing; cheaper, degenerate for long series). See `latent_paths`.

    Raises:
        TypeError: bad `key`, `resampler`, `name` or `initial_sites`.
        ValueError: bad `num_particles` or `ess_threshold`; at trace time, a model the
            handler cannot marginalise (the message says what to change).
    """

    def __init__(
        self,
        fn: Callable | None = None,
        *,
        num_particles: int,
        resampler: Resampler | None = None,
        key: PRNGKey | None = None,
        name: str | None = None,
        initial_sites: tuple[str, ...] | list[str] | None = None,
        ess_threshold: float = 1.0,
        latent_paths: bool = False,
        smoothing: str = "backward",
    ) -> None:
        self.num_particles = check_count("num_particles", num_particles, minimum=2)
        if not isinstance(latent_paths, bool):
            raise TypeError(f"latent_paths must be a bool, got {latent_paths!r}.")
        if smoothing not in SMOOTHING_METHODS:
            raise ValueError(f"smoothing must be one of {SMOOTHING_METHODS}, got {smoothing!r}.")
        self.latent_paths = latent_paths
        self.smoothing = smoothing
        resampler = check_resampler(resampler)
        self.moves_particles = _moves_particles(resampler)
        self.ess_threshold = check_fraction("ess_threshold", ess_threshold)
        self.resampler = resampler
        if key is not None:
            check_key(key)
        self.key = key
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}.")
        self.name = name
        if initial_sites is not None:
            if isinstance(initial_sites, str) or not all(
                isinstance(site, str) for site in initial_sites
            ):
                raise TypeError(
                    "initial_sites must be a tuple of site names, e.g. ('x0',); got "
                    f"{initial_sites!r}."
                )
            initial_sites = tuple(initial_sites)
        self.initial_sites = initial_sites
        self._plan: Plan | None = None
        self._call: tuple[tuple, dict] | None = None
        super().__init__(fn)

    # ------------------------------------------------------------------ handler protocol

    def __call__(self, *args, **kwargs):
        """Run the wrapped model with its scan marginalised (or wrap `args[0]`)."""
        if self.fn is None:
            return super().__call__(*args, **kwargs)
        self._plan = probe_model(self.fn, args, kwargs, self.initial_sites)
        self._call = (args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._plan = None
            self._call = None

    def __enter__(self):
        self._statics: dict[str, Array] = {}
        self._initial: list[dict] = []
        self._latent_before: list[tuple[str, Array]] = []
        self._scan_seen = False
        self._hidden: set[str] = set()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        result = super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and not self._scan_seen:
            raise ValueError(
                "marginalize found no numpyro.contrib.control_flow.scan in the model: write "
                "the time loop with scan(body, init, xs), whose latent sites it marginalises."
            )
        return result

    def process_message(self, msg: dict) -> None:
        """Take over the scan; hide the initial state's sites before it from outer handlers."""
        if msg["type"] == "control_flow":
            if self._scan_seen:
                raise ValueError(
                    "marginalize supports one scan per model; this model runs a second one. "
                    "Merge the time loops into one scan."
                )
            self._scan_seen = True
            if msg["kwargs"].get("enum", False):
                raise ValueError(
                    "marginalize cannot be combined with enumeration of the scan's sites."
                )
            msg["fn"] = self._marginal_scan
            return
        if msg["type"] != "sample" or self._scan_seen:
            return
        plan = self._plan
        if plan is not None and msg["name"] in plan.initial_sites:
            if msg["is_observed"]:
                raise ValueError(f"initial site {msg['name']!r} is observed; it must be latent.")
            # Drawn per particle by the filter: hidden from the handlers outside, with a
            # placeholder value for the model's own code.
            msg["stop"] = True
            placeholder = msg["fn"](
                rng_key=jax.random.PRNGKey(DEFAULT_SEED), sample_shape=msg["kwargs"]["sample_shape"]
            )
            msg["value"] = placeholder
            self._initial.append(msg)
            self._hidden.add(msg["name"])
        elif plan is not None and msg["name"] in plan.prefix_observed:
            msg["stop"] = True
            self._hidden.add(msg["name"])

    def postprocess_message(self, msg: dict) -> None:
        """Record the values of the static sites before the scan."""
        if msg["type"] == "sample" and not self._scan_seen and msg["name"] not in self._hidden:
            self._statics[msg["name"]] = msg["value"]
            if not msg["is_observed"]:
                self._latent_before.append((msg["name"], msg["value"]))

    # ------------------------------------------------------------------ the filter

    def _marginal_scan(
        self,
        f,
        init,
        xs,
        length,
        reverse,
        rng_key=None,
        substitute_stack=None,
        history=1,
        **unused,
    ):
        """The scan's answer: `((length, rng_key, filtered final carry), (sites, ys))`."""
        length = _scan_length(xs, length, reverse, history)
        conditions = [data for kind, data in (substitute_stack or []) if kind == "condition"]
        substitutes = [data for kind, data in (substitute_stack or []) if kind == "substitute"]
        self._check_initial_carry(init)
        body = Body(f, length, conditions, self.moves_particles)
        draw_first = self._prefix_sampler() if self._initial else None
        if draw_first is not None:
            carry_shape = jax.eval_shape(
                lambda key: jax.tree.map(lambda a: a[0], draw_first(key, 1)[0]),
                jax.random.PRNGKey(0),
            )
        else:
            carry_shape = jax.eval_shape(lambda: init)
        info = body.inspect(carry_shape, step_slice(xs, jnp.int32(0)))
        self._check_substitutes(substitutes, info)
        _, unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), carry_shape))
        self._check_carry(carry_shape)
        offset = 0 if draw_first is None else 1
        num_steps = length + offset
        covariates = step_covariates(xs, offset)
        key = self._resolve_key(rng_key)
        # The data reach the filter as the scan's xs (covariates) and the body's observed
        # sites; its observations are only a (T,) placeholder with nothing missing.
        result: FilterResult = run_filter(
            key,
            BodyKernel(body, init, draw_first, unravel),
            jnp.zeros((num_steps,), jnp.result_type(float)),
            num_particles=self.num_particles,
            resampler=self.resampler,
            ess_threshold=self.ess_threshold,
            covariates=covariates,
        ).result
        paths = {}
        if self.latent_paths:
            start = PathStart(
                init,
                draw_first,
                {site["name"]: site["value"] for site in self._initial},
                carry_shape,
            )
            paths = smoothed_sites(
                jax.random.fold_in(key, 1),
                body,
                info,
                start,
                num_steps,
                covariates,
                self.num_particles,
                self.smoothing,
            )
        factor_trace = _factor_trace(self.name or info.first_observed, result, paths)
        final_carry = unravel(result.filtered_mean[-1])
        ys = jax.tree.map(
            lambda s: jnp.full((length, *s.shape), jnp.nan if is_floating(s) else 0, s.dtype),
            info.output_shape,
        )
        return (jnp.asarray(length), rng_key, final_carry), (PytreeTrace(factor_trace), ys)

    def _check_initial_carry(self, init):
        """In a bare `with` block, refuse an initial carry that is a latent site's value."""
        if self._initial or self._plan is not None:
            return
        init_leaves = jax.tree.leaves(init)
        for site_name, value in self._latent_before:
            if any(value is leaf for leaf in init_leaves):
                raise ValueError(
                    f"the scan's initial carry is the latent site {site_name!r} sampled "
                    "before the scan: wrap the model, marginalize(model, ...), so the "
                    "handler can re-run the code before the scan for each particle (a "
                    "bare `with marginalize(...)` block cannot)."
                )

    def _prefix_sampler(self):
        """`prefix_sampler` for the wrapped model's code before the scan."""
        if self._call is None:
            raise ValueError(
                "latent sites before the scan form its initial state: wrap the model, "
                "marginalize(model, ...), so the handler can re-run that code per particle."
            )
        for site in self._initial:
            if site["fn"].support.is_discrete and self.moves_particles:
                raise ValueError(discrete_message(site["name"]))
        args, kwargs = self._call
        return prefix_sampler(
            self.fn, args, kwargs, self._statics, self._initial, self._plan.prefix_observed
        )

    def _check_substitutes(self, substitutes, info):
        """Refuse `substitute(data=...)` entries that name the scan body's sites.

        A substituted latent path is what the filter integrates out, and a substituted
        observed value is data, which `condition` gives. With `latent_paths` the latent sites'
        names are also deterministic sites of the marginalised model, which the substitute
        handler outside sets as usual. A `substitute_fn` (as NUTS's initialisation and
        potential pass) is asked about the marginalised model's sites only, which do not
        include the body's.
        """
        recorded = set(info.latent_shapes) | set(info.deterministic_shapes)
        body_sites = recorded | set(info.observed_names)
        allowed = recorded if self.latent_paths else set()
        for data in substitutes:
            if not isinstance(data, dict):
                continue
            named = sorted(site for site in data if site in body_sites and site not in allowed)
            if named:
                raise ValueError(
                    f"a substitute handler sets the scan body's site {named[0]!r}, which "
                    "marginalize integrates out (a latent path is not a value it can fix). "
                    "Observe data with condition(data=...), fix a latent path by dropping "
                    "marginalize, or substitute only static sites outside the scan."
                )

    def _resolve_key(self, rng_key):
        if self.key is not None:
            return self.key
        return jax.random.PRNGKey(DEFAULT_SEED) if rng_key is None else rng_key

    def _check_carry(self, carry_shape):
        if not self.moves_particles:
            return
        for leaf in jax.tree.leaves(carry_shape):
            if not is_floating(leaf):
                raise ValueError(
                    f"the scan carries a {leaf.dtype} array, which a resampler that moves "
                    "particles (diffusion, optimal transport, Gumbel-softmax) would move off "
                    "its integer values. Pass counters "
                    "such as the time index through xs (e.g. xs=(jnp.arange(T), y)), or use "
                    "an index resampler (resampling.systematic()) for discrete states."
                )


def _moves_particles(resampler) -> bool:
    """The resampler's `moves_particles` trait; a resampler that declares none is refused."""
    try:
        moves = resampler.moves_particles
    except AttributeError:
        moves = None
    if not isinstance(moves, bool):
        raise TypeError(
            f"resampler {resampler!r} does not say whether it moves particles: marginalize "
            "needs its moves_particles trait (a bool) to know whether discrete states survive "
            "resampling. Build it with a numpyro_diffres.resampling factory, or set "
            "moves_particles and has_ancestors on it (see resampling.Resampler)."
        )
    return moves


def _scan_length(xs, length, reverse, history) -> int:
    """The scan's number of steps; refuse the scan forms the filter cannot run."""
    if reverse:
        raise ValueError("marginalize runs forward filters only: use scan(..., reverse=False).")
    if history != 1:
        raise ValueError(f"marginalize needs scan(..., history=1), got history={history}.")
    if length is None:
        leaves = jax.tree.leaves(xs)
        if not leaves:
            raise ValueError("scan over xs=None needs length=...")
        length = jnp.shape(leaves[0])[0]
    return int(length)


def _factor_trace(name, result, paths) -> dict:
    """The sites the scan hands back: the factor and, with latent paths, the paths."""
    with handlers.block(), handlers.trace() as factor_trace:
        numpyro.factor(name, result.log_likelihood_increments)
        for site_name, value in paths.items():
            numpyro.deterministic(site_name, value)
    # `block` marked the recorded messages as stopped; the scan re-applies them to the
    # handlers outside, which must all see them.
    for site in factor_trace.values():
        site.pop("stop", None)
    return factor_trace
