"""Resamplers with one signature: `resampler(key, log_weights, particles)`.

`diffusion` is the differentiable default; the others are the baselines it is compared with.
`adaptive` and `gradient_decay` wrap any resampler.

Build resamplers with the lower-case factories. Every resampler says what it is through two
traits, which wrappers pass on from the resampler they wrap: `moves_particles` (its outputs are
new points, as diffusion, optimal-transport and Gumbel-softmax resampling give) and
`has_ancestors` (its outputs are input particles picked by index). Ask those rather than the
class. For the filter on explicit noise (pseudo-marginal samplers) a resampler may also take
standard normals in place of a key (`takes_noise`); `noise_driven` gives that form of a
resampler (sorted systematic for `systematic()`, the same map for `diffusion(...)`).

The classes (`Diffusion`, `IndexResampler`, ...) are exported for their methods
(`OptimalTransport.solve` returns its `TransportInfo`); their constructors take no checks: the
factories are the public way to make one.
"""

from numpyro_diffres.resampling.adaptive import adaptive
from numpyro_diffres.resampling.base import Resampler
from numpyro_diffres.resampling.decay import GradientDecay, gradient_decay
from numpyro_diffres.resampling.diffusion import Diffusion, NoiseDrivenDiffusion, diffusion
from numpyro_diffres.resampling.gumbel import GumbelSoftmax, gumbel_softmax
from numpyro_diffres.resampling.index import IndexResampler, multinomial, stratified, systematic
from numpyro_diffres.resampling.noise_driven import NoiseResampler, noise_driven
from numpyro_diffres.resampling.optimal_transport import (
    OptimalTransport,
    TransportInfo,
    optimal_transport,
)
from numpyro_diffres.resampling.soft import Soft, soft
from numpyro_diffres.resampling.sorted import SortedSystematic, sorted_systematic
from numpyro_diffres.resampling.stop_gradient import StopGradient, stop_gradient

__all__ = [
    "adaptive",
    "Diffusion",
    "GradientDecay",
    "GumbelSoftmax",
    "IndexResampler",
    "NoiseDrivenDiffusion",
    "NoiseResampler",
    "OptimalTransport",
    "Resampler",
    "Soft",
    "SortedSystematic",
    "StopGradient",
    "TransportInfo",
    "diffusion",
    "gradient_decay",
    "gumbel_softmax",
    "multinomial",
    "noise_driven",
    "optimal_transport",
    "soft",
    "sorted_systematic",
    "stop_gradient",
    "stratified",
    "systematic",
]
