"""Site-level helpers of `marginalize`: per-particle keys, indexed conditions, log-densities."""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.primitives import Messenger

from numpyro_diffres._log_density import safe_log_prob
from numpyro_diffres._typing import Array

__all__ = [
    "IndexedCondition",
    "KeyedSites",
    "cast_like",
    "discrete_message",
    "is_deterministic",
    "is_floating",
    "is_latent",
    "is_observed",
    "observed_log_prob",
]


class KeyedSites(Messenger):
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


class IndexedCondition(Messenger):
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


def observed_log_prob(site: dict) -> Array:
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
    missing = jnp.any(jnp.isnan(value)) if is_floating(value) else jnp.asarray(False)
    filled = (
        jnp.where(jnp.isnan(value), jnp.zeros_like(value), value) if is_floating(value) else value
    )
    log_prob = safe_log_prob(fn, filled)
    if site.get("scale") is not None:
        log_prob = site["scale"] * log_prob
    return jnp.where(missing, 0.0, log_prob)


def is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def cast_like(new, old):
    """`new` with the dtypes of `old` (a body may return a carry in another precision)."""
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), new, old)


def is_deterministic(site: dict) -> bool:
    return site["type"] == "deterministic"


def is_observed(site: dict) -> bool:
    return site["type"] == "sample" and site["is_observed"]


def is_floating(value) -> bool:
    return jnp.issubdtype(jnp.result_type(value.dtype), jnp.floating)


def discrete_message(site_name: str) -> str:
    return (
        f"latent site {site_name!r} is discrete, and this resampler moves particles to new, "
        "non-integer values (diffusion, optimal transport, Gumbel-softmax do). Use an index "
        "resampler (resampler=numpyro_diffres.resampling.systematic()) or enumerate the site "
        "(numpyro.contrib.funsor) instead of marginalize."
    )
