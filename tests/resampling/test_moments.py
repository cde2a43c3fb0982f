"""Every resampler against importance-weighted Gaussians whose target moments are known.

Particles $X_i \\sim N(0, I_d)$ weighted by the likelihood $N(y\\,1; X_i, s^2 I)$ target
$N(m\\,1, v I)$ with $m = y/(1+s^2)$, $v = s^2/(1+s^2)$. Errors are standardised by the Monte
Carlo error of multinomial resampling, which is known in closed form:

* against the weighted input (what the resampler is given): conditionally on the input,
  multinomial resampling gives a mean with variance $\\sigma_w^2/N$ and a variance with
  variance $(\\mu_{4,w} - \\sigma_w^4)/N$, from the input's own weighted moments;
* against the exact target: that plus the self-normalised importance-sampling variance
  $E_\\pi[(\\pi/p)(h - \\pi h)^2]/N$, computed by Gauss-Hermite quadrature below.

One tolerance serves all the standardised checks, `MAX_RMS_Z = 2.5`: for a resampler as
accurate as multinomial the root-mean-square of $m$ standardised errors is about 1, and
$P(\\chi^2_m / m > 2.5^2) < 10^{-4}$ even for the smallest pool used here ($m = 4$); a resampler
with 2.5 times multinomial's error, or a bias of that size, fails.

Gumbel-softmax and entropic OT are biased for every temperature/epsilon: they contract the
cloud. They must still reproduce the mean within Monte Carlo error (OT exactly, up to the
Sinkhorn tolerance), and their variance is checked for that documented contraction instead.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import logsumexp

from numpyro_diffres import resampling

OBSERVATION, LIKELIHOOD_VARIANCE = 1.0, 1.0
TARGET_MEAN = OBSERVATION / (1.0 + LIKELIHOOD_VARIANCE)
TARGET_VARIANCE = LIKELIHOOD_VARIANCE / (1.0 + LIKELIHOOD_VARIANCE)
# Unnormalised on purpose: every resampler must normalise the log-weights itself.
LOG_WEIGHT_OFFSET = -40.0

SMALL, LARGE = 256, 4096
# Seeds (vmapped) per size; fewer at N = 4096, where the O(N^2) resamplers are expensive.
REPEATS = {SMALL: 16, LARGE: 4}
DIMENSIONS = (1, 3)
MAX_RMS_Z = 2.5
# Under the N^{-1/2} rate the error ratio between N = 256 and N = 4096 is 0.25; half of the
# error at N = 256 allows each pooled RMS estimate to be off by a factor sqrt(2) (with >= 16
# pooled terms at N = 4096, P(F(16, 64) > 4) < 1e-3), while a bias that does not shrink with N
# gives a ratio near 1.
MAX_ERROR_RATIO = 0.5

RESAMPLERS = {
    "diffusion": resampling.diffusion(),
    "diffusion_euler_full": resampling.diffusion(integrator="euler", covariance="full"),
    "multinomial": resampling.multinomial(),
    "systematic": resampling.systematic(),
    "stratified": resampling.stratified(),
    "stop_gradient": resampling.stop_gradient(),
    "soft": resampling.soft(0.5),
    "gumbel_softmax": resampling.gumbel_softmax(0.3),
    "optimal_transport": resampling.optimal_transport(0.5),
}
BIASED = ("gumbel_softmax", "optimal_transport")
# The reverse SDE variants are not here: with K = 8 steps their output variance is inflated
# by a discretisation bias that test_diffusion.py checks against its exact Gaussian-limit value.


def _marks(name, n):
    # O(N^2) per call: the N = 4096 runs dominate the file's run time.
    quadratic = name.startswith("diffusion") or name in BIASED
    return [pytest.mark.slow] if n == LARGE and quadratic else []


def _cases(names, sizes):
    return [pytest.param(name, n, marks=_marks(name, n)) for name in names for n in sizes]


def _problem(n, d):
    """`(particles, log_weights)` of shapes `(R, N, d)` and `(R, N)`, float64 numpy."""
    rng = np.random.default_rng(1000 * n + d)
    particles = rng.standard_normal((REPEATS[n], n, d))
    log_weights = (
        -0.5 * np.sum((particles - OBSERVATION) ** 2, axis=-1) / LIKELIHOOD_VARIANCE
        + LOG_WEIGHT_OFFSET
    )
    return particles, log_weights


@functools.cache
def _resample(name, n, d):
    """Resample R independent clouds (vmapped over seeds); float64 numpy results."""
    particles, log_weights = _problem(n, d)
    keys = jax.random.split(jax.random.key(7 * n + d), REPEATS[n])
    run = jax.jit(jax.vmap(RESAMPLERS[name]))
    new_particles, new_log_weights = run(keys, jnp.asarray(log_weights), jnp.asarray(particles))
    return np.asarray(new_particles, np.float64), np.asarray(new_log_weights, np.float64)


def _moments(log_weights, particles):
    """Weighted mean, variance and fourth central moment per cloud, each `(R, d)`."""
    weights = np.exp(log_weights - logsumexp(log_weights, axis=1, keepdims=True))
    mean = np.einsum("rn,rnd->rd", weights, particles)
    centred = particles - mean[:, None, :]
    variance = np.einsum("rn,rnd->rd", weights, centred**2)
    fourth = np.einsum("rn,rnd->rd", weights, centred**4)
    return mean, variance, fourth


@functools.cache
def _target_error_constants(d):
    """N times the asymptotic variance of (output mean, output variance) per coordinate
    against the exact target: importance sampling plus multinomial resampling."""
    nodes, node_weights = hermegauss(80)
    node_weights = node_weights / math.sqrt(2.0 * math.pi)  # expectations under N(0, 1)
    x = TARGET_MEAN + math.sqrt(TARGET_VARIANCE) * nodes  # so these are under pi
    log_ratio = (
        -0.5 * (x - TARGET_MEAN) ** 2 / TARGET_VARIANCE
        - 0.5 * math.log(TARGET_VARIANCE)
        + 0.5 * x**2
    )
    ratio = np.exp(log_ratio)  # pi(x) / p(x) per coordinate; the density ratio factorises
    other_coordinates = np.sum(node_weights * ratio) ** (d - 1)
    deviation = x - TARGET_MEAN
    mean_constant = np.sum(node_weights * ratio * deviation**2) * other_coordinates
    variance_constant = (
        np.sum(node_weights * ratio * (deviation**2 - TARGET_VARIANCE) ** 2) * other_coordinates
    )
    # Resampling noise is conditionally mean-zero given the input, so the variances add.
    return mean_constant + TARGET_VARIANCE, variance_constant + 2.0 * TARGET_VARIANCE**2


def _rms(values):
    return float(np.sqrt(np.mean(np.square(values))))


def _standardised_errors(name, n, d):
    """Errors of the output mean and variance against the weighted input and the target."""
    particles, log_weights = _problem(n, d)
    new_particles, new_log_weights = _resample(name, n, d)
    mean_in, variance_in, fourth_in = _moments(log_weights, particles)
    mean_out, variance_out, _ = _moments(new_log_weights, new_particles)
    mean_constant, variance_constant = _target_error_constants(d)
    return {
        "mean_vs_input": (mean_out - mean_in) / np.sqrt(variance_in / n),
        "variance_vs_input": (variance_out - variance_in)
        / np.sqrt((fourth_in - variance_in**2) / n),
        "mean_vs_target": (mean_out - TARGET_MEAN) / np.sqrt(mean_constant / n),
        "variance_vs_target": (variance_out - TARGET_VARIANCE) / np.sqrt(variance_constant / n),
    }


@pytest.mark.parametrize("d", DIMENSIONS)
@pytest.mark.parametrize(("name", "n"), _cases(RESAMPLERS, (SMALL, LARGE)))
def test_moments_within_monte_carlo_error(name, n, d):
    z = _standardised_errors(name, n, d)
    assert np.all(np.isfinite(_resample(name, n, d)[0]))
    assert _rms(z["mean_vs_input"]) <= MAX_RMS_Z, z["mean_vs_input"]
    assert _rms(z["mean_vs_target"]) <= MAX_RMS_Z, z["mean_vs_target"]
    if name in BIASED:
        # Documented bias: the cloud contracts. Unbiased resampling would give standardised
        # variance errors of mean 0 and standard error 1/sqrt(R d); demand a contraction
        # three standard errors beyond that (the measured one is far larger).
        pooled = z["variance_vs_input"]
        assert np.mean(pooled) < -3.0 / math.sqrt(pooled.size), pooled
    else:
        assert _rms(z["variance_vs_input"]) <= MAX_RMS_Z, z["variance_vs_input"]
        assert _rms(z["variance_vs_target"]) <= MAX_RMS_Z, z["variance_vs_target"]


def _names(names):
    # Everything that needs the N = 4096 run of an O(N^2) resampler is slow.
    return [pytest.param(name, marks=_marks(name, LARGE)) for name in names]


@pytest.mark.parametrize("name", _names(RESAMPLERS))
def test_error_shrinks_with_num_particles(name):
    keys = ("mean_vs_target",) if name in BIASED else ("mean_vs_target", "variance_vs_target")
    errors = {}
    for n in (SMALL, LARGE):
        # Back from standardised to raw errors (up to an N-independent constant per
        # dimension and moment), pooled over d = 1 and d = 3.
        pooled = [
            _standardised_errors(name, n, d)[key].ravel() / math.sqrt(n)
            for d in DIMENSIONS
            for key in keys
        ]
        errors[n] = _rms(np.concatenate(pooled))
    print(f"{name}: pooled RMS error {errors}")
    assert errors[LARGE] <= MAX_ERROR_RATIO * errors[SMALL], errors


def _sliced_wasserstein(particles, log_weights, other, other_log_weights, num_directions=32):
    """Sliced 1-Wasserstein distance between two weighted clouds of shape `(N, d)`."""
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((num_directions, particles.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    weights = np.exp(log_weights - logsumexp(log_weights))
    other_weights = np.exp(other_log_weights - logsumexp(other_log_weights))
    signed = np.concatenate([weights, -other_weights])
    distances = []
    for direction in directions:
        values = np.concatenate([particles @ direction, other @ direction])
        order = np.argsort(values)
        # W1 in one dimension is the integral of |F - G| between consecutive sorted values.
        cdf_gap = np.cumsum(signed[order])[:-1]
        distances.append(np.sum(np.abs(cdf_gap) * np.diff(values[order])))
    return float(np.mean(distances))


@pytest.mark.parametrize("d", DIMENSIONS)
@pytest.mark.parametrize("name", _names(n for n in RESAMPLERS if n not in BIASED))
def test_distance_to_weighted_input_shrinks(name, d):
    distances = {}
    for n in (SMALL, LARGE):
        particles, log_weights = _problem(n, d)
        new_particles, new_log_weights = _resample(name, n, d)
        distances[n] = np.mean(
            [
                _sliced_wasserstein(*pair)
                for pair in zip(new_particles, new_log_weights, particles, log_weights, strict=True)
            ]
        )
    print(f"{name}, d={d}: sliced W1 {distances}")
    # Same rate argument as MAX_ERROR_RATIO: expected ratio 0.25 for an N^{-1/2} rate.
    assert distances[LARGE] <= MAX_ERROR_RATIO * distances[SMALL], distances
