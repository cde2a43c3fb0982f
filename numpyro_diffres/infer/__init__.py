"""Pseudo-marginal MCMC kernels for NumPyro models with particle-filter likelihoods.

`PMMH` (particle marginal Metropolis-Hastings) and `CorrelatedPMMH` are
`numpyro.infer.mcmc.MCMCKernel`s: `MCMC(ndr.infer.PMMH(model), num_warmup=..., num_samples=...)`.
They sample the exact posterior of the statics for any number of particles when the
likelihood estimate is unbiased (index resampling).
"""

from numpyro_diffres.infer.pmmh import PMMH, CorrelatedPMMH, PMMHState

__all__ = ["PMMH", "CorrelatedPMMH", "PMMHState"]
