"""Resamplers with one signature: `resampler(key, log_weights, particles)`.

`diffusion` is the differentiable default; the others are the baselines it is compared with.
`adaptive` and `gradient_decay` wrap any resampler.

Build resamplers with the lower-case factories. The classes they return (`Diffusion`,
`IndexResampler`, ...) are exported too, for one reason: to ask what a resampler is
(`isinstance(r, resampling.IndexResampler)` tells whether a scheme is differentiable, and
`OptimalTransport.solve` returns its `TransportInfo`). Their constructors take no checks: the
factories are the public way to make one.
"""

from numpyro_diffres.resampling.adaptive import adaptive
from numpyro_diffres.resampling.base import Resampler
from numpyro_diffres.resampling.decay import GradientDecay, gradient_decay
from numpyro_diffres.resampling.diffusion import Diffusion, diffusion
from numpyro_diffres.resampling.gumbel import GumbelSoftmax, gumbel_softmax
from numpyro_diffres.resampling.index import IndexResampler, multinomial, stratified, systematic
from numpyro_diffres.resampling.optimal_transport import (
    OptimalTransport,
    TransportInfo,
    optimal_transport,
)
from numpyro_diffres.resampling.soft import Soft, soft
from numpyro_diffres.resampling.stop_gradient import StopGradient, stop_gradient

__all__ = [
    "adaptive",
    "Diffusion",
    "GradientDecay",
    "GumbelSoftmax",
    "IndexResampler",
    "OptimalTransport",
    "Resampler",
    "Soft",
    "StopGradient",
    "TransportInfo",
    "diffusion",
    "gradient_decay",
    "gumbel_softmax",
    "multinomial",
    "optimal_transport",
    "soft",
    "stop_gradient",
    "stratified",
    "systematic",
]
