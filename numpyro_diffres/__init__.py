"""numpyro_diffres: differentiable particle-filter likelihoods for NumPyro.

Diffusion resampling (Andersson & Zhao, arXiv:2512.10401) makes the fixed-noise particle
filter log-likelihood smooth in the model parameters, so SVI and NUTS can use it.
"""

from numpyro_diffres import diagnostics, infer, resampling
from numpyro_diffres.filtering import FilterResult, particle_filter
from numpyro_diffres.linear_gaussian import (
    LinearGaussianParams,
    dense_log_likelihood,
    kalman_filtered_moments,
    kalman_log_likelihood,
    linear_gaussian,
)
from numpyro_diffres.marginalize import marginalize
from numpyro_diffres.primitives import particle_factor, sample_latent_paths, sample_trajectory
from numpyro_diffres.samplers import BlackjaxInfo, BlackjaxResult, blackjax_nuts, to_inference_data
from numpyro_diffres.smoothing import forecast, particle_smoother
from numpyro_diffres.ssm import StateSpaceModel, simulate

__all__ = [
    "BlackjaxInfo",
    "BlackjaxResult",
    "FilterResult",
    "LinearGaussianParams",
    "StateSpaceModel",
    "blackjax_nuts",
    "dense_log_likelihood",
    "diagnostics",
    "forecast",
    "infer",
    "kalman_filtered_moments",
    "kalman_log_likelihood",
    "linear_gaussian",
    "marginalize",
    "particle_factor",
    "particle_filter",
    "particle_smoother",
    "resampling",
    "sample_latent_paths",
    "sample_trajectory",
    "simulate",
    "to_inference_data",
]
