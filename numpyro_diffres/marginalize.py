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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.extend import core as jax_core
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.ops.pytree import PytreeTrace
from numpyro.primitives import Messenger

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres.checks import check_callable, check_count, check_fraction, check_key
from numpyro_diffres.filtering import FilterResult, run_filter
from numpyro_diffres.guards import safe_log_prob
from numpyro_diffres.resampling import Resampler, adaptive, diffusion, systematic
from numpyro_diffres.smoothing import (
    SMOOTHING_METHODS,
    backward_simulation,
    forward_pass,
    mark_impossible,
    trace_genealogy,
)

__all__ = ["marginalize"]

DEFAULT_SEED = 0


class _Plan(NamedTuple):
    """What the probe found out about the code around the scan."""

    initial_sites: tuple[str, ...]
    prefix_observed: tuple[str, ...]


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
        resampler = diffusion() if resampler is None else resampler
        check_callable(
            "resampler",
            resampler,
            "resampler(key, log_weights, particles)",
            "numpyro_diffres.resampling.diffusion()",
        )
        self.moves_particles = _moves_particles(resampler)
        self.ess_threshold = check_fraction("ess_threshold", ess_threshold)
        self.resampler = None if self.ess_threshold <= 0.0 else adaptive(resampler, ess_threshold)
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
        self._plan: _Plan | None = None
        self._call: tuple[tuple, dict] | None = None
        super().__init__(fn)

    # ------------------------------------------------------------------ handler protocol

    def __call__(self, *args, **kwargs):
        """Run the wrapped model with its scan marginalised (or wrap `args[0]`)."""
        if self.fn is None:
            return super().__call__(*args, **kwargs)
        self._plan = _probe(self.fn, args, kwargs, self.initial_sites)
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
        if reverse:
            raise ValueError("marginalize runs forward filters only: use scan(..., reverse=False).")
        if history != 1:
            raise ValueError(f"marginalize needs scan(..., history=1), got history={history}.")
        if length is None:
            leaves = jax.tree.leaves(xs)
            if not leaves:
                raise ValueError("scan over xs=None needs length=...")
            length = jnp.shape(leaves[0])[0]
        length = int(length)
        conditions = [data for kind, data in (substitute_stack or []) if kind == "condition"]
        substitutes = [data for kind, data in (substitute_stack or []) if kind == "substitute"]
        initial_form = bool(self._initial)
        if not initial_form and self._plan is None:
            init_leaves = jax.tree.leaves(init)
            for site_name, value in self._latent_before:
                if any(value is leaf for leaf in init_leaves):
                    raise ValueError(
                        f"the scan's initial carry is the latent site {site_name!r} sampled "
                        "before the scan: wrap the model, marginalize(model, ...), so the "
                        "handler can re-run the code before the scan for each particle (a "
                        "bare `with marginalize(...)` block cannot)."
                    )

        body = _Body(f, xs, length, conditions, self.moves_particles)
        if initial_form:
            draw_first = self._prefix_runner()
            carry_shape = jax.eval_shape(
                lambda key: jax.tree.map(lambda a: a[0], draw_first(key, 1)[0]),
                jax.random.PRNGKey(0),
            )
        else:
            carry_shape = jax.eval_shape(lambda: init)
        info = body.inspect(carry_shape)
        self._check_substitutes(substitutes, info)
        _, unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), carry_shape))
        self._check_carry(carry_shape)
        name = self.name or info.first_observed
        offset = 1 if initial_form else 0

        class Kernel:
            def initialize(self, key, num_particles, observation, missing):
                if initial_form:
                    carries, log_weights = draw_first(key, num_particles)
                    particles = jax.vmap(lambda c: ravel_pytree(c)[0])(carries)
                else:
                    keys = jax.random.split(key, num_particles)
                    particles, log_correction, log_likelihood = jax.vmap(
                        lambda k: body.step(k, init, jnp.int32(0))
                    )(keys)
                    log_weights = log_correction + log_likelihood
                return particles, log_weights - math.log(num_particles)

            def propagate(self, key, particle, time, observation, missing):
                return body.step(key, unravel(particle), time - offset)

        num_steps = length + offset
        key = self._resolve_key(rng_key)
        result: FilterResult = run_filter(
            key,
            Kernel(),
            jnp.zeros((num_steps,), jnp.result_type(float)),
            num_particles=self.num_particles,
            resampler=self.resampler,
        )
        paths = {}
        if self.latent_paths:
            paths = _smoothed_sites(
                jax.random.fold_in(key, 1),
                body,
                info,
                _PathStart(
                    init,
                    draw_first if initial_form else None,
                    {site["name"]: site["value"] for site in self._initial},
                    carry_shape,
                ),
                num_steps,
                self.num_particles,
                self.smoothing,
            )
        with handlers.block(), handlers.trace() as factor_trace:
            numpyro.factor(name, result.log_likelihood_increments)
            for site_name, value in paths.items():
                numpyro.deterministic(site_name, value)
        # `block` marked the recorded messages as stopped; the scan re-applies them to the
        # handlers outside, which must all see them.
        for site in factor_trace.values():
            site.pop("stop", None)
        final_carry = unravel(result.filtered_mean[-1])
        ys = jax.tree.map(
            lambda s: jnp.full((length, *s.shape), jnp.nan if _floating(s) else 0, s.dtype),
            info.output_shape,
        )
        return (jnp.asarray(length), rng_key, final_carry), (PytreeTrace(factor_trace), ys)

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
            if not _floating(leaf):
                raise ValueError(
                    f"the scan carries a {leaf.dtype} array, which a resampler that moves "
                    "particles (diffusion, optimal transport, Gumbel-softmax) would move off "
                    "its integer values. Pass counters "
                    "such as the time index through xs (e.g. xs=(jnp.arange(T), y)), or use "
                    "an index resampler (resampling.systematic()) for discrete states."
                )

    def _prefix_runner(self):
        """`draw(key, N) -> (initial carries, log-weights)` from the code before the scan."""
        if self._call is None:
            raise ValueError(
                "latent sites before the scan form its initial state: wrap the model, "
                "marginalize(model, ...), so the handler can re-run that code per particle."
            )
        args, kwargs = self._call
        model = self.fn
        statics = dict(self._statics)
        initial = list(self._initial)
        prefix_observed = self._plan.prefix_observed
        for site in initial:
            if site["fn"].support.is_discrete and self.moves_particles:
                raise ValueError(_discrete_message(site["name"]))

        def run(key, values):
            """One particle: `(initial carry, log-weight)`; `values` fixes initial sites."""
            # The scan is answered with placeholders and the model runs to its end: an
            # exception stopping it at the scan would leave NumPyro's handler stack broken,
            # as the model's own wrappers (e.g. `marginalize(condition(model, ...))`) are
            # entered a second time here and pop the stack from their first entry on error.
            stopper = _SkipScan()
            with (
                handlers.block(),
                handlers.trace() as prefix_trace,
                handlers.substitute(data={**statics, **values}),
                _KeyedSites(key),
                stopper,
            ):
                model(*args, **kwargs)
            log_weight = jnp.zeros((), jnp.result_type(float))
            for site_name in prefix_observed:
                log_weight = log_weight + _observed_log_prob(prefix_trace[site_name])
            for site in initial:
                value = prefix_trace[site["name"]]["value"]
                if _floating(value):
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


class _BodyInfo(NamedTuple):
    first_observed: str
    observed_names: tuple[str, ...]
    output_shape: Any
    latent_shapes: dict[str, jax.ShapeDtypeStruct]
    deterministic_shapes: dict[str, jax.ShapeDtypeStruct]


class _Body:
    """The scan body run for one particle at one step, under its own handlers."""

    def __init__(self, f, xs, length, conditions, moves_particles):
        self.f = f
        self.xs = xs
        self.length = length
        self.conditions = conditions
        self.moves_particles = moves_particles

    def _inputs(self, index):
        return jax.tree.map(lambda a: jnp.take(jnp.asarray(a), index, axis=0), self.xs)

    def _run(self, key, carry, index, values=None):
        """Run the body once; `values` fixes latent sites (no draw for them)."""
        with handlers.block(), handlers.trace() as body_trace, _KeyedSites(key):
            with (
                _IndexedCondition(self.conditions, index, self.length),
                handlers.substitute(data=values or {}),
            ):
                new_carry, output = self.f(carry, self._inputs(index))
        return new_carry, output, body_trace

    def inspect(self, carry_shape) -> _BodyInfo:
        """Trace the body once on abstract values and check what the handler supports."""
        found = {}

        def trace_once(carry):
            new_carry, output, body_trace = self._run(jax.random.PRNGKey(0), carry, jnp.int32(0))
            found["trace"] = body_trace
            for kind, keep in (
                ("latent_shapes", _is_latent),
                ("deterministic_shapes", _is_deterministic),
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
        latent = [site for site in body_trace.values() if _is_latent(site)]
        observed = [site for site in body_trace.values() if _is_observed(site)]
        if not latent:
            raise ValueError(
                "the scan body has no latent sample sites: there is nothing to marginalise; "
                "drop marginalize, or move the latent states into the scan body."
            )
        for site in latent:
            if site["fn"].support.is_discrete and self.moves_particles:
                raise ValueError(_discrete_message(site["name"]))
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
        return _BodyInfo(
            observed[0]["name"],
            tuple(site["name"] for site in observed),
            output_shape,
            found["latent_shapes"],
            found["deterministic_shapes"],
        )

    def step(self, key, carry, index, record=False):
        """`(new particle vector, log_correction, log_likelihood)` for one particle.

        With `record`, the values of the latent and of the deterministic sites (two dicts) are
        appended as a fourth and fifth output.
        """
        new_carry, _, body_trace = self._run(key, carry, index)
        new_carry = _like(new_carry, carry)
        flat, _ = ravel_pytree(new_carry)
        log_likelihood = jnp.zeros((), jnp.result_type(float))
        for site in body_trace.values():
            if _is_observed(site):
                log_likelihood = log_likelihood + _observed_log_prob(site)
        log_correction = jnp.zeros((), log_likelihood.dtype)
        if _floating(flat):
            finite = jnp.all(jnp.isfinite(flat))
            # An overflowing state (e.g. invalid parameters) is an impossible particle, not a
            # NaN poisoning the cloud.
            flat = jnp.where(finite, flat, jnp.zeros_like(flat))
            log_correction = jnp.where(finite, log_correction, -jnp.inf)
        if record:
            sites = body_trace.values()
            latent = {site["name"]: site["value"] for site in sites if _is_latent(site)}
            recorded = {site["name"]: site["value"] for site in sites if _is_deterministic(site)}
            return flat, log_correction, log_likelihood, latent, recorded
        return flat, log_correction, log_likelihood

    def log_density(self, carry, index, values):
        """`(new carry vector, log p(latent sites = values, observed sites | carry))`."""
        new_carry, _, body_trace = self._run(jax.random.PRNGKey(0), carry, index, values)
        new_carry = _like(new_carry, carry)
        log_density = jnp.zeros((), jnp.result_type(float))
        for site in body_trace.values():
            if _is_latent(site):
                log_density = log_density + jnp.sum(safe_log_prob(site["fn"], site["value"]))
            elif _is_observed(site):
                log_density = log_density + _observed_log_prob(site)
        return ravel_pytree(new_carry)[0], log_density


class _PathStart(NamedTuple):
    """How the filter starts: a fixed carry, or a draw of the sites before the scan."""

    init: Any
    draw_first: Callable | None
    initial_values: dict[str, Array]
    carry_shape: Any


def _smoothed_sites(key, body, info, start, num_steps, num_particles, method) -> dict:
    """One smoothed draw of the latent sites, `{name: value}` with NUTS's shapes.

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
        def initialize(self, key, num_particles, observation, missing):
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
                    lambda k: body.step(k, start.init, jnp.int32(0), record=True)
                )(keys)
                log_weights = log_correction + log_likelihood
                initial = no_initial
            particles = jax.vmap(pack, in_axes=(0, 0 if offset else None, 0, 0))(
                carries, initial, sites, recorded
            )
            return particles, log_weights - math.log(num_particles)

        def propagate(self, key, particle, time, observation, missing):
            carry = unravel_carry(unravel(particle)["carry"])
            new, log_correction, log_likelihood, sites, recorded = body.step(
                key, carry, time - offset, record=True
            )
            return pack(new, no_initial, sites, recorded), log_correction, log_likelihood

    def log_transition(particle, following, t):
        current, following = unravel(particle), unravel(following)
        carry, log_density = body.log_density(
            unravel_carry(current["carry"]), t + 1 - offset, following["sites"]
        )
        target = following["carry"]
        if _floating(target):
            tolerance = 1e3 * float(jnp.finfo(target.dtype).eps)
            close = jnp.abs(carry - target) <= tolerance * (1.0 + jnp.abs(target))
        else:
            close = carry == target
        return jnp.where(jnp.all(close) & jnp.isfinite(log_density), log_density, -jnp.inf)

    forward_key, draw_key, backward_key = jax.random.split(key, 3)
    observations = jnp.zeros((num_steps,), flat_carry.dtype)
    final, history = forward_pass(
        forward_key, Kernel(), observations, num_particles, systematic(), True
    )
    last = jax.random.categorical(draw_key, final.log_weights, shape=(1,))
    if method == "backward":
        paths, possible = backward_simulation(backward_key, log_transition, history, last)
    else:
        paths, possible = trace_genealogy(history, last)
    path = jax.vmap(unravel)(mark_impossible(paths, possible & final.alive)[0])
    values = {name: value[0] for name, value in path["initial"].items()}
    for part in ("sites", "recorded"):
        values.update({name: value[offset:] for name, value in path[part].items()})
    return values


class _KeyedSites(Messenger):
    """Give latent sites keys: the first the particle's own key, the j-th `fold_in(key, j)`.

    With one latent site per step the draw is `fn.sample(key)`, as in `StateSpaceModel`
    kernels, so the same key gives the same noise.
    """

    def __init__(self, key):
        self.key = key
        self.count = 0
        super().__init__()

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        if msg["kwargs"].get("rng_key") is not None:
            return
        key = self.key if self.count == 0 else jax.random.fold_in(self.key, self.count)
        self.count += 1
        msg["kwargs"]["rng_key"] = key


class _IndexedCondition(Messenger):
    """Observe body sites as `condition` handlers outside say: step `index` of a series.

    `conditions` holds, innermost first, each handler's `data` dict or `condition_fn`
    (`site -> value or None`), as NumPyro's scan collects them; the outermost one that gives
    a value wins, as on the handler stack (an outer handler processes the site last).
    """

    def __init__(self, conditions, index, length):
        self.conditions = conditions
        self.index = index
        self.length = length
        super().__init__()

    def _value(self, msg):
        for condition in reversed(self.conditions):
            if isinstance(condition, dict):
                value = condition.get(msg["name"])
            else:
                value = condition(msg)
            if value is not None:
                return value
        return None

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        value = self._value(msg)
        if value is None:
            return
        value = jnp.asarray(value)
        event_ndim = len(msg["kwargs"]["sample_shape"]) + len(msg["fn"].shape())
        if value.ndim == event_ndim + 1 and value.shape[0] == self.length:
            value = jnp.take(value, self.index, axis=0)
        msg["value"] = value
        msg["is_observed"] = True


class _SkipScan(Messenger):
    """Record the first scan's initial carry and answer it with placeholders, not running it.

    The scan returns its initial carry and zero (or false) stacked outputs, so the model's
    code after it runs on values of the right shapes; their values are never used.
    """

    def __init__(self):
        self.init = None
        self.seen = False
        super().__init__()

    def process_message(self, msg):
        if msg["type"] != "control_flow":
            return
        f, init, xs, length, _ = msg["args"]
        if not self.seen:
            self.init = init
            self.seen = True
        if length is None:
            length = jnp.shape(jax.tree.leaves(xs)[0])[0]
        x0 = jax.tree.map(lambda a: jnp.asarray(a)[0], xs)
        _, output = jax.eval_shape(
            lambda c, x: handlers.block(handlers.seed(f, jax.random.PRNGKey(0)))(c, x), init, x0
        )
        ys = jax.tree.map(lambda a: jnp.zeros((length, *a.shape), a.dtype), output)
        msg["value"] = ((length, None, init), (PytreeTrace({}), ys))
        msg["stop"] = True


class _Probe(Messenger):
    """Run the model once symbolically to find the initial sites and bad dependencies.

    Latent sites before the scan get the values `markers[j]` (one input per site), the scan
    returns values of `scan_marker`; reachability in the resulting jaxpr says which sites the
    initial carry and the observed sites depend on.
    """

    def __init__(self, markers, scan_marker):
        self.markers = markers
        self.scan_marker = scan_marker
        self.latent: list[str] = []
        self.observed_before: list[tuple[str, Array]] = []
        self.observed_after: list[tuple[str, Array]] = []
        self.init = None
        self.body_values: list[Array] = []
        self.scan_seen = False
        super().__init__()

    def process_message(self, msg):
        if msg["type"] == "control_flow":
            if self.scan_seen:
                raise ValueError("marginalize supports one scan per model.")
            self.scan_seen = True
            f, init, xs, length, _ = msg["args"]
            self.init = init
            if length is None:
                length = jnp.shape(jax.tree.leaves(xs)[0])[0]
            x0 = jax.tree.map(lambda a: jnp.asarray(a)[0], xs)
            _, output = jax.eval_shape(
                lambda c, x: handlers.block(handlers.seed(f, jax.random.PRNGKey(0)))(c, x),
                init,
                x0,
            )
            carry = jax.tree.map(lambda a: _marked(jnp.shape(a), jnp.result_type(a), self), init)
            # The body run on a carry that does not depend on the sites before the scan: the
            # sites its values depend on are used inside the body, hence static.
            with handlers.block(), handlers.trace() as body_trace, handlers.seed(rng_seed=1):
                new_carry, new_output = f(carry, x0)
            self.body_values = jax.tree.leaves((new_carry, new_output)) + [
                jnp.sum(site["fn"].log_prob(site["value"]))
                for site in body_trace.values()
                if site["type"] == "sample"
            ]
            ys = jax.tree.map(lambda s: _marked((length, *s.shape), s.dtype, self), output)
            msg["value"] = ((length, None, carry), (PytreeTrace({}), ys))
            msg["stop"] = True
            return
        if msg["type"] != "sample":
            return
        if msg["is_observed"]:
            return
        if self.scan_seen:
            return
        index = len(self.latent)
        if index >= len(self.markers):
            return
        self.latent.append(msg["name"])
        shape = jax.eval_shape(
            lambda: msg["fn"](
                rng_key=jax.random.PRNGKey(0), sample_shape=msg["kwargs"]["sample_shape"]
            )
        )
        msg["value"] = jnp.zeros(shape.shape, shape.dtype) + self.markers[index].astype(shape.dtype)

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            entry = (msg["name"], jnp.sum(msg["fn"].log_prob(msg["value"])))
            (self.observed_after if self.scan_seen else self.observed_before).append(entry)


def _marked(shape, dtype, probe):
    marker = probe.scan_marker
    if jnp.issubdtype(dtype, jnp.bool_):
        return jnp.zeros(shape, bool) | (marker > 0)
    return jnp.zeros(shape, dtype) + marker.astype(dtype)


def _probe(model, args, kwargs, declared) -> _Plan:
    """Find the initial sites and check the observed sites around the scan."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.core.Tracer)]

    def count():
        skipper = _SkipScan()
        counter = _CountLatent(skipper)
        with handlers.block(), handlers.seed(rng_seed=0), counter, skipper:
            model(*args, **kwargs)
        return counter.count, skipper.seen

    num_latent, has_scan = count()
    if not has_scan:
        raise ValueError(
            "marginalize found no numpyro.contrib.control_flow.scan in the model: write the "
            "time loop with scan(body, init, xs), whose latent sites it marginalises."
        )
    found = {}

    def symbolic(markers, scan_marker, traced_values):
        full = list(leaves)
        for i, value in zip(traced, traced_values, strict=True):
            full[i] = value
        call_args, call_kwargs = jax.tree.unflatten(treedef, full)
        probe = _Probe(markers, scan_marker)
        with handlers.block(), handlers.seed(rng_seed=0), probe:
            model(*call_args, **call_kwargs)
        found["probe"] = probe
        return (
            jax.tree.leaves(probe.init),
            [value for _, value in probe.observed_before],
            [value for _, value in probe.observed_after],
            probe.body_values,
        )

    markers = [jnp.zeros(()) for _ in range(num_latent)]
    closed = jax.make_jaxpr(symbolic)(markers, jnp.zeros(()), [leaves[i] for i in traced])
    probe = found["probe"]
    jaxpr = closed.jaxpr
    sizes = [
        len(jax.tree.leaves(probe.init)),
        len(probe.observed_before),
        len(probe.observed_after),
        len(probe.body_values),
    ]
    outputs, start = [], 0
    for size in sizes:
        outputs.append(jaxpr.outvars[start : start + size])
        start += size
    init_out, before_out, after_out, body_out = outputs

    scan_reach = _reachable(jaxpr, [jaxpr.invars[num_latent]], after_out)
    for (site_name, _), reaches in zip(probe.observed_after, scan_reach, strict=True):
        if reaches:
            raise ValueError(
                f"the observed site {site_name!r} after the scan depends on the scan's "
                "outputs (its latent states), which marginalize integrates out and cannot see. "
                "Move that observation into the scan body (e.g. observe it at the last step)."
            )
    if declared is not None:
        unknown = [site for site in declared if site not in probe.latent]
        if unknown:
            raise ValueError(
                f"initial_sites {unknown} are not latent sites before the scan; those are "
                f"{probe.latent}."
            )
        initial = tuple(declared)
    else:
        initial = tuple(
            site_name
            for j, site_name in enumerate(probe.latent)
            if any(_reachable(jaxpr, [jaxpr.invars[j]], init_out))
            and not any(_reachable(jaxpr, [jaxpr.invars[j]], body_out))
        )
    sources = [jaxpr.invars[probe.latent.index(site)] for site in initial]
    prefix_observed = tuple(
        site_name
        for (site_name, _), reaches in zip(
            probe.observed_before, _reachable(jaxpr, sources, before_out), strict=True
        )
        if reaches
    )
    return _Plan(initial, prefix_observed)


class _CountLatent(Messenger):
    """Count the latent sites before the scan that `scan` (a `_SkipScan`) answers."""

    def __init__(self, scan):
        self.scan = scan
        self.count = 0
        super().__init__()

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not self.scan.seen:
            self.count += 1


def _reachable(jaxpr, sources, targets) -> list[bool]:
    """Whether each target variable is computed from any source (conservative)."""
    tainted = set(sources)
    for equation in jaxpr.eqns:
        if any(not isinstance(var, jax_core.Literal) and var in tainted for var in equation.invars):
            tainted.update(equation.outvars)
    return [not isinstance(var, jax_core.Literal) and var in tainted for var in targets]


def _observed_log_prob(site: dict) -> Array:
    """Log-density of an observed site; 0 where its value contains NaN (missing)."""
    fn, value = site["fn"], jnp.asarray(site["value"])
    if site.get("mask") is not None:
        raise ValueError(
            f"site {site['name']!r} is masked; marginalize does not support handlers.mask on "
            "observed sites it evaluates: mark missing values with NaN."
        )
    sample_ndim = len(site["kwargs"].get("sample_shape", ()))
    batch_ndim = len(fn.batch_shape) + sample_ndim
    if batch_ndim:
        fn = dist.Independent(
            fn.expand(tuple(value.shape[: value.ndim - fn.event_dim])), batch_ndim
        )
    missing = jnp.any(jnp.isnan(value)) if _floating(value) else jnp.asarray(False)
    filled = (
        jnp.where(jnp.isnan(value), jnp.zeros_like(value), value) if _floating(value) else value
    )
    log_prob = safe_log_prob(fn, filled)
    if site.get("scale") is not None:
        log_prob = site["scale"] * log_prob
    return jnp.where(missing, 0.0, log_prob)


def _is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def _like(new, old):
    """`new` with the dtypes of `old` (a body may return a carry in another precision)."""
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), new, old)


def _is_deterministic(site: dict) -> bool:
    return site["type"] == "deterministic"


def _is_observed(site: dict) -> bool:
    return site["type"] == "sample" and site["is_observed"]


def _floating(value) -> bool:
    return jnp.issubdtype(jnp.result_type(value.dtype), jnp.floating)


def _discrete_message(site_name: str) -> str:
    return (
        f"latent site {site_name!r} is discrete, and this resampler moves particles to new, "
        "non-integer values (diffusion, optimal transport, Gumbel-softmax do). Use an index "
        "resampler (resampler=numpyro_diffres.resampling.systematic()) or enumerate the site "
        "(numpyro.contrib.funsor) instead of marginalize."
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
