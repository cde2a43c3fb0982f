"""The symbolic probe of `marginalize`: what the code around the scan depends on.

The model runs once under `jax.make_jaxpr` with a marker input per latent site before the scan;
reachability in the jaxpr says which sites form the initial state and which observed sites
depend on it or on the scan's outputs.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from numpyro import handlers
from numpyro.ops.pytree import PytreeTrace
from numpyro.primitives import Messenger

from numpyro_diffres._typing import Array

__all__ = ["Plan", "Probe", "SkipScan", "probe_model", "reachable"]


class Plan(NamedTuple):
    """What the probe found out about the code around the scan."""

    initial_sites: tuple[str, ...]
    prefix_observed: tuple[str, ...]


class SkipScan(Messenger):
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


class Probe(Messenger):
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


def probe_model(model, args, kwargs, declared) -> Plan:
    """Find the initial sites and check the observed sites around the scan."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.core.Tracer)]

    num_latent = _count_latent_before_scan(model, args, kwargs)
    found = {}

    def symbolic(markers, scan_marker, traced_values):
        full = list(leaves)
        for i, value in zip(traced, traced_values, strict=True):
            full[i] = value
        call_args, call_kwargs = jax.tree.unflatten(treedef, full)
        probe = Probe(markers, scan_marker)
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

    scan_reach = reachable(jaxpr, [jaxpr.invars[num_latent]], after_out)
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
            if any(reachable(jaxpr, [jaxpr.invars[j]], init_out))
            and not any(reachable(jaxpr, [jaxpr.invars[j]], body_out))
        )
    sources = [jaxpr.invars[probe.latent.index(site)] for site in initial]
    prefix_observed = tuple(
        site_name
        for (site_name, _), reaches in zip(
            probe.observed_before, reachable(jaxpr, sources, before_out), strict=True
        )
        if reaches
    )
    return Plan(initial, prefix_observed)


def _count_latent_before_scan(model, args, kwargs) -> int:
    """The number of latent sites before the scan; refuse a model without a scan."""
    skipper = SkipScan()
    counter = _CountLatent(skipper)
    with handlers.block(), handlers.seed(rng_seed=0), counter, skipper:
        model(*args, **kwargs)
    if not skipper.seen:
        raise ValueError(
            "marginalize found no numpyro.contrib.control_flow.scan in the model: write the "
            "time loop with scan(body, init, xs), whose latent sites it marginalises."
        )
    return counter.count


class _CountLatent(Messenger):
    """Count the latent sites before the scan that `scan` (a `SkipScan`) answers."""

    def __init__(self, scan):
        self.scan = scan
        self.count = 0
        super().__init__()

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not self.scan.seen:
            self.count += 1


def reachable(jaxpr, sources, targets) -> list[bool]:
    """Whether each target variable is computed from any source (conservative)."""
    tainted = set(sources)
    for equation in jaxpr.eqns:
        if any(not isinstance(var, jax_core.Literal) and var in tainted for var in equation.invars):
            tainted.update(equation.outvars)
    return [not isinstance(var, jax_core.Literal) and var in tainted for var in targets]
