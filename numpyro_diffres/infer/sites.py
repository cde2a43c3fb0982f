"""What a pseudo-marginal kernel needs to know of a model's sites.

Read once from the prototype trace that `numpyro.infer.util.initialize_model` records: which
latent sites are statics (moved by the random walk), which hold the particle filter's noise
(marked by `particle_factor(..., noise="sampled")`, moved by Crank-Nicolson), which sites make
up the likelihood estimate (observed and factor sites), and whether every particle filter in
the model gives an unbiased estimate (index resampling), without which PMMH is not exact.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_diffres._typing import Array, PRNGKey

__all__ = ["NOISE_FLAG", "FILTER_INFO", "ModelSites", "inspect_sites"]

# `infer` keys that `particle_factor` sets on its sites.
NOISE_FLAG = "particle_noise"
FILTER_INFO = "particle_filter"


class ModelSites(NamedTuple):
    """The roles of a model's sites for a pseudo-marginal kernel.

    Attributes:
        noise: names of the latent sites holding the filter's standard-normal noise.
        observed: names of the sites whose log-densities sum to the likelihood estimate.
        correlation: the Crank-Nicolson $\\rho$ of the noise moves.
    """

    noise: tuple[str, ...]
    observed: tuple[str, ...]
    correlation: float

    def statics(self, z: dict) -> dict:
        """The entries of `z` the random walk moves (every latent site but the noise)."""
        return {name: value for name, value in z.items() if name not in self.noise}

    def draw_noise(self, key: PRNGKey, z: dict) -> dict:
        """`z` with every noise site replaced by a fresh standard-normal draw."""
        keys = jax.random.split(key, max(len(self.noise), 1))
        fresh = {
            name: jax.random.normal(k, jnp.shape(z[name]), jnp.result_type(z[name]))
            for k, name in zip(keys, self.noise, strict=False)
        }
        return {**z, **fresh}

    def move_noise(self, key: PRNGKey, z: dict) -> dict:
        """Crank-Nicolson proposals $\\rho u + \\sqrt{1 - \\rho^2} \\varepsilon$ of the noise."""
        fresh = self.draw_noise(key, z)
        rho = self.correlation
        return {name: rho * z[name] + math.sqrt(1.0 - rho**2) * fresh[name] for name in self.noise}

    def noise_log_prior(self, z: dict) -> Array:
        """$\\log N(u; 0, I)$ of the noise sites, up to a constant."""
        return sum((-0.5 * jnp.sum(jnp.square(z[name])) for name in self.noise), 0.0)

    def log_likelihood(self, trace: dict) -> Array:
        """The likelihood estimate: the summed log-densities of the observed sites."""
        total = jnp.zeros(())
        for name in self.observed:
            site = trace[name]
            log_prob = jnp.sum(site["fn"].log_prob(site["value"]))
            scale = site.get("scale")
            total = total + (log_prob if scale is None else scale * log_prob)
        return total


def inspect_sites(trace: dict, correlation: float) -> ModelSites:
    """Classify the sites of a prototype trace; refuse what PMMH cannot sample exactly.

    Args:
        trace: the model trace of `initialize_model`.
        correlation: the Crank-Nicolson $\\rho$ of the noise moves.

    Returns:
        A `ModelSites`.

    Raises:
        ValueError: a discrete latent site, a model without latent sites, or a particle
            filter whose resampler does not give an unbiased estimate.
    """
    noise, observed, latent = [], [], []
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            observed.append(name)
            _check_unbiased(name, site)
        elif site["infer"].get(NOISE_FLAG, False):
            noise.append(name)
        else:
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"PMMH moves continuous latent sites by a random walk; site {name!r} is "
                    "discrete. Marginalise it out (e.g. with ndr.marginalize or "
                    "infer={'enumerate': 'parallel'} and NUTS) or make it continuous."
                )
            latent.append(name)
    if not latent and not noise:
        raise ValueError("PMMH needs at least one latent site to sample; the model has none.")
    return ModelSites(tuple(noise), tuple(observed), float(correlation))


def _check_unbiased(name: str, site: dict) -> None:
    info = site["infer"].get(FILTER_INFO)
    if info is not None and not info["unbiased"]:
        raise ValueError(
            f"particle_factor({name!r}) uses the resampler {info['resampler']}, whose "
            "likelihood estimate is not unbiased, so PMMH on it would not sample the exact "
            "posterior. For PMMH pass resampler=ndr.resampling.systematic() (or stratified(), "
            "multinomial()) to this particle_factor, or noise='sampled' with resampler=None "
            "or systematic(). (A noise='sampled' factor with diffusion resampling is meant "
            "for NUTS on the parameters and the noise: pseudo-marginal HMC.)"
        )
