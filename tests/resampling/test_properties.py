"""Property tests: every resampler on hostile clouds drawn by hypothesis.

Clouds: N live particles (2 <= N <= 512) padded with dead particles (log-weight $-\\infty$,
placed 100 scales away so that any mass leaking onto them shows) to a bucket size in
{2, 7, 64, 512}, so that each resampler compiles once per bucket; event shapes (), (3,) and
(2, 3); log-weights spread over up to $10^3$, with one dominant particle, with ties or all
equal, plus an unnormalised offset; particles Gaussian, tied or all equal, at scales $10^{-8}$
to $10^{8}$ and locations up to 100 scales from 0.

Properties: shapes kept, output finite, log-weights normalised, the weighted mean preserved
within a bound derived below for each resampler (with its rounding terms), gradients with
respect to the particles and the log-weights finite, and index resamplers copying only
particles of positive weight.

Every bound holds with probability at least $1 - 10^{-9}$ per coordinate (most are
deterministic), so with `derandomize=True` a failure is a reproducible bug, not bad luck.
The same bounds serve float32 and float64 (`JAX_ENABLE_X64=1`): their rounding terms are
written in the working precision's `eps`.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from numpyro_diffres import resampling

RESAMPLERS = {
    "diffusion": resampling.diffusion(),
    "multinomial": resampling.multinomial(),
    "systematic": resampling.systematic(),
    "stratified": resampling.stratified(),
    "stop_gradient": resampling.stop_gradient(),
    "soft": resampling.soft(0.5),
    "gumbel_softmax": resampling.gumbel_softmax(0.3),
    "optimal_transport": resampling.optimal_transport(0.5),
}
INDEX = ("multinomial", "systematic", "stratified", "stop_gradient", "soft")

# (bucket size, event shape): one compile per resampler and bucket. The event shape is tied to
# the bucket because compiling dominates the run time (every shape is one more compile).
BUCKETS = ((2, (2, 3)), (7, ()), (64, (3,)), (512, ()))
DEAD_OFFSET = 100.0
# Failure probability of each statistical bound, per coordinate: L = log(2 / delta).
LOG_TWO_OVER_DELTA = math.log(2.0 / 1e-9)
# |mean of N standard normals| <= GAUSSIAN_QUANTILE / sqrt(N) with probability 1 - 1e-9.
GAUSSIAN_QUANTILE = 6.1

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _dtype():
    return jnp.result_type(float)


class Cloud(NamedTuple):
    log_weights: np.ndarray  # (bucket,), in the working dtype; dead entries are -inf
    particles: np.ndarray  # (bucket, *event_shape), in the working dtype
    num_live: int
    location: float
    scale: float
    kind: str  # "weights/particles", reported as a hypothesis event


@st.composite
def clouds(draw):
    index = draw(st.integers(0, len(BUCKETS) - 1))
    bucket, event_shape = BUCKETS[index]
    smallest = 2 if index == 0 else BUCKETS[index - 1][0] + 1
    num_live = draw(st.integers(smallest, bucket))
    weights_kind = draw(st.sampled_from(["spread", "dominant", "ties", "equal"]))
    particles_kind = draw(st.sampled_from(["gaussian", "ties", "collapsed"]))
    spread = 10.0 ** draw(st.floats(-3.0, 3.0))  # range of the live log-weights, up to 1e3
    offset = draw(st.sampled_from([0.0, 50.0, -700.0]))  # unnormalised on purpose
    scale = 10.0 ** draw(st.floats(-8.0, 8.0))
    location = draw(st.sampled_from([0.0, 1.0, -100.0]))  # in units of the scale
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    if weights_kind == "spread":
        live_log_weights = rng.uniform(-spread, 0.0, num_live)
    elif weights_kind == "dominant":
        live_log_weights = -20.0 - spread * rng.uniform(1.0, 2.0, num_live)
        live_log_weights[rng.integers(num_live)] = 0.0
    elif weights_kind == "ties":
        live_log_weights = rng.choice([0.0, -spread], num_live)
    else:
        live_log_weights = np.zeros(num_live)
    log_weights = np.full(bucket, -np.inf)
    log_weights[:num_live] = live_log_weights + offset

    shape = (num_live, *event_shape)
    if particles_kind == "gaussian":
        base = rng.standard_normal(shape)
    elif particles_kind == "ties":
        base = rng.integers(-1, 2, shape).astype(float)
    else:
        base = np.broadcast_to(rng.standard_normal(event_shape), shape)
    dead = DEAD_OFFSET + rng.standard_normal((bucket - num_live, *event_shape))
    particles = scale * (location + np.concatenate([base, dead]))

    dtype = _dtype()
    return Cloud(
        np.asarray(jnp.asarray(log_weights, dtype)),
        np.asarray(jnp.asarray(particles, dtype)),
        num_live,
        location,
        scale,
        f"{weights_kind}/{particles_kind}",
    )


@functools.cache
def _value_and_grad(name):
    """Jitted `(log_weights, particles, key, location, scale) -> ((E, aux), gradients)`.

    `E` is a smooth bounded test function of the output in units of the cloud's scale, so
    its gradient is finite whenever the resampler's is; `aux` holds the output and, for OT,
    the final Sinkhorn marginal error.
    """
    resampler = RESAMPLERS[name]

    def expectation(log_weights, particles, key, location, scale):
        if name == "optimal_transport":
            new_particles, new_log_weights, info = resampler.solve(key, log_weights, particles)
            error = info.error
        else:
            new_particles, new_log_weights = resampler(key, log_weights, particles)
            error = jnp.zeros(())
        standardised = (new_particles.reshape(new_particles.shape[0], -1) - location) / scale
        value = jnp.sum(jnp.exp(new_log_weights) * jnp.sum(jnp.sin(standardised), axis=1))
        return value, (new_particles, new_log_weights, error)

    return jax.jit(jax.value_and_grad(expectation, argnums=(0, 1), has_aux=True))


def _diffusion_coefficients(resampler):
    """`(A, B)` with $|\\bar z_K| \\le |A|\\,|\\bar z_0| + B R$ for the ODE integrator.

    One step is $z' = a_k z + b_k \\hat m_k(z)$ with $a_k = g - \\delta/v_k$ and
    $b_k = \\delta c_k / v_k$ (growth $g$, drift $\\delta$), where $\\hat m_k$ is a convex
    combination of the whitened particles, so $|\\hat m_k| \\le R = \\max_i |Z_i|$ per
    coordinate. Averaging over the outputs and unrolling the K steps gives the bound with
    $A = \\prod_k a_k$ and $B = \\sum_k |b_k| \\prod_{m > k} |a_m|$.
    """
    assert resampler.ode
    delta = resampler.time / resampler.num_steps
    rate = resampler.rate
    if resampler.integrator == "exponential":
        growth, drift = math.exp(rate * delta), math.expm1(rate * delta)
    else:
        growth, drift = 1.0 + rate * delta, rate * delta
    product, total = 1.0, 0.0
    for k in range(resampler.num_steps):
        time = resampler.time - k * delta
        decay, variance = math.exp(-rate * time), -math.expm1(-2.0 * rate * time)
        a, b = growth - drift / variance, drift * decay / variance
        product, total = product * a, total * abs(a) + abs(b)
    return product, total


def _mean_bound(name, cloud, num_outputs, sinkhorn_error):
    """Per-coordinate bound on |output mean - weighted input mean|, and that input mean."""
    n = num_outputs
    dtype = cloud.particles.dtype
    eps = float(np.finfo(dtype).eps)
    live_log_weights = cloud.log_weights[: cloud.num_live].astype(np.float64)
    weights = np.exp(live_log_weights - logsumexp(live_log_weights))
    weights = weights / weights.sum()
    live = cloud.particles[: cloud.num_live].reshape(cloud.num_live, -1).astype(np.float64)
    everything = cloud.particles.reshape(n, -1).astype(np.float64)
    mean = weights @ live
    deviation = live - mean
    variance = weights @ deviation**2
    spread = np.max(np.abs(deviation), axis=0)  # b: largest deviation of a live particle
    spread_all = np.max(np.abs(everything - mean), axis=0)
    value_range = np.ptp(live, axis=0)
    magnitude = np.max(np.abs(live), axis=0)

    # Rounding. The library normalises the log-weights in the working precision: each weight
    # is off by a relative (2 max|l| + N) eps (the subtraction of the log normaliser from
    # log-weights of size max|l|, and the N-term sum), which moves the mean by that times b
    # (the errors sum to zero, so sum dw_i (X_i - mu) <= max|dw/w| sum w_i |X_i - mu|).
    largest_log_weight = np.max(np.abs(live_log_weights))
    weight_rounding = (2.0 * largest_log_weight + n) * eps * spread
    # Convex combinations and means computed in the working precision: N eps of the values.
    arithmetic = n * eps * magnitude
    log_term = LOG_TWO_OVER_DELTA

    def bernstein(variance, bound, size):
        # P(|average of `size` independent zero-mean terms| >= t) <= 2 exp(-size t^2 /
        # (2 variance + 2 bound t / 3)) for |term| <= bound; solved for t at probability delta.
        linear = bound * log_term / (3.0 * size)
        return linear + np.sqrt(linear**2 + 2.0 * variance * log_term / size)

    if name == "multinomial":
        # N independent draws from the weighted cloud: Bernstein with the weighted variance.
        bound = bernstein(variance, spread, n) + weight_rounding
    elif name in ("systematic", "stop_gradient"):
        # Deterministic. Systematic counts satisfy |C_k - N W_k| < 1 for every cumulative
        # count C_k and weight W_k, so by summation by parts the mean error is at most
        # sum_k |X_{k+1} - X_k| / N over the live particles in input order. The float
        # cumulative sum is off by at most k eps, which adds N k eps <= N^2 eps to each |C - NW|.
        variation = np.sum(np.abs(np.diff(live, axis=0)), axis=0)
        bound = variation * (1.0 + n * n * eps) / n + weight_rounding
    elif name == "stratified":
        # Both the deterministic bound of systematic (|C_k - N W_k| < 1 holds too) and
        # Bernstein for N independent draws, one per stratum: their variances average to at
        # most the weighted variance, each term lies within the range of the cloud.
        variation = np.sum(np.abs(np.diff(live, axis=0)), axis=0)
        bound = np.minimum(variation * (1.0 + n * n * eps) / n, bernstein(variance, value_range, n))
        bound = bound + weight_rounding
    elif name == "soft":
        # Self-normalised: error = A / B with A = mean_j r_j (Y_j - mu), B = mean_j r_j, where
        # r = w / q <= 1 / alpha, E r = 1, E r^2 <= 1 / alpha, E[r^2 (Y - mu)^2] <= var / alpha.
        # Bernstein for A and B; when B's bound leaves 0 possible, only the hull remains (the
        # output is a convex combination of drawn particles; a particle drawn with weight 0,
        # dead ones included, counts only if every draw has weight 0).
        alpha = RESAMPLERS["soft"].alpha
        numerator = bernstein(variance / alpha, spread / alpha, n)
        denominator = 1.0 - bernstein(1.0 / alpha, 1.0 / alpha, n)
        statistical = numerator / denominator if denominator > 0 else np.inf
        bound = np.minimum(statistical, spread_all) + weight_rounding
    elif name == "gumbel_softmax":
        # Biased for tau > 0, so no statistical bound: every output is a convex combination of
        # the live particles (dead ones get softmax weight exactly 0), so is their mean.
        bound = spread + weight_rounding + arithmetic
    elif name == "optimal_transport":
        # Sinkhorn's last update makes the row marginals exact and `error` is the L1 error of
        # the columns; normalising the columns moves the rows by at most that error. The rows
        # then differ from w by error + 2 N eps^2 (the weight floor) + N eps (rounding of the
        # error itself) in L1, and sum(rho - w) = 0 bounds the mean error by that times the
        # largest deviation of any particle, dead ones included.
        # (A negative error means none was recorded: only the convex hull is left.)
        l1 = sinkhorn_error + 2.0 * n * eps**2 + n * eps if sinkhorn_error >= 0 else 1.0
        bound = np.minimum(spread_all, l1 * spread_all) + weight_rounding + arithmetic
    elif name == "diffusion":
        # |mean z_K| <= |A| |mean z_0| + B R (see _diffusion_coefficients) in whitened units,
        # with the start's mean |mean z_0| <= 6.1 / sqrt(N) (probability 1 - 1e-9) and
        # R s <= b + |mu~ - mu|, where mu~ is the library's mean (off by the rounding terms);
        # s is the whitening scale with the library's documented floor (relative jitter,
        # absolute sqrt(tiny)), computed with relative error N eps. Un-whitening adds a
        # rounding of a few eps of the values, inside `arithmetic` since N >= 2.
        resampler = RESAMPLERS["diffusion"]
        a, b = _diffusion_coefficients(resampler)
        tiny = float(np.finfo(dtype).tiny)
        whitening = np.sqrt(variance * (1.0 + resampler.jitter) + math.sqrt(tiny))
        start = abs(a) * GAUSSIAN_QUANTILE / math.sqrt(n) * whitening
        mean_rounding = weight_rounding + arithmetic
        bound = (start + b * (spread + mean_rounding)) * (1.0 + n * eps)
        bound = bound + mean_rounding + arithmetic
    else:
        raise AssertionError(name)
    return bound, mean


def _check(name, cloud):
    n = cloud.particles.shape[0]
    event(f"N={n}")
    event(cloud.kind)
    dtype = cloud.particles.dtype
    eps = float(np.finfo(dtype).eps)
    key = jax.random.key(n + cloud.num_live)
    (_, (new_particles, new_log_weights, error)), gradients = _value_and_grad(name)(
        jnp.asarray(cloud.log_weights),
        jnp.asarray(cloud.particles),
        key,
        jnp.asarray(cloud.location * cloud.scale, dtype),
        jnp.asarray(cloud.scale, dtype),
    )
    new_particles = np.asarray(new_particles, np.float64)
    new_log_weights = np.asarray(new_log_weights, np.float64)

    assert new_particles.shape == cloud.particles.shape
    assert new_log_weights.shape == (n,)
    assert np.all(np.isfinite(new_particles))
    assert not np.any(np.isnan(new_log_weights)) and not np.any(new_log_weights == np.inf)
    # log sum exp of N terms in the working precision: relative error at most N eps.
    assert abs(logsumexp(new_log_weights)) <= n * eps, logsumexp(new_log_weights)
    for gradient in gradients:
        assert np.all(np.isfinite(np.asarray(gradient))), gradient

    flat = new_particles.reshape(n, -1)
    if name in INDEX:
        # Copies of input rows, never of a dead one (soft may draw one, but with weight 0).
        live = cloud.particles[: cloud.num_live].reshape(cloud.num_live, -1)
        copied = np.any(np.all(flat[:, None, :] == live[None, :, :], axis=2), axis=1)
        kept = new_log_weights > -np.inf
        assert np.all(copied[kept]), np.flatnonzero(~copied & kept)

    output_weights = np.exp(new_log_weights - logsumexp(new_log_weights))
    bound, mean = _mean_bound(name, cloud, n, float(error))
    # Both means are N-term float64 sums of weights that sum to 1 within N float64 eps:
    # 4 N float64 eps of the values on top.
    bound = bound + 4 * n * np.finfo(np.float64).eps * np.max(np.abs(flat), axis=0)
    mean_error = np.abs(output_weights @ flat - mean)
    assert np.all(mean_error <= bound), (mean_error, bound)


@pytest.mark.parametrize("name", list(RESAMPLERS))
@SETTINGS
@given(cloud=clouds())
def test_hostile_clouds(name, cloud):
    _check(name, cloud)


# --- index draws: never a zero-weight particle ---------------------------------------------


@functools.cache
def _index_draws(scheme):
    """Jitted `(keys, log_weights) -> indices` of shape `(keys, N)`."""
    resampler = resampling.IndexResampler(scheme)
    draw = jax.vmap(
        lambda key, log_weights: resampler.indices(key, log_weights, log_weights.size),
        in_axes=(0, None),
    )
    return jax.jit(draw)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic", "stratified"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    dead=st.sampled_from(["leading", "trailing", "interior"]),
    deficit=st.floats(0.0, 1e-3),
)
def test_index_draws_never_pick_zero_weight(scheme, seed, dead, deficit):
    # Cumulative sums in float end up to N ulps below 1; the `deficit` (up to 1e-3, far more
    # than rounding, so that the rare event becomes frequent) stands for that. Draws that fall
    # above the total mass must go to the last particle of positive weight, not to a dead one.
    n = 64
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.1, 1.0, n)
    zero = {
        "leading": np.arange(n) < 8,
        "trailing": np.arange(n) >= n - 8,
        "interior": (np.arange(n) % 5) == 2,
    }[dead]
    weights[zero] = 0.0
    weights = weights / weights.sum() * (1.0 - deficit)
    with np.errstate(divide="ignore"):
        log_weights = jnp.asarray(np.log(weights), _dtype())
    keys = jax.random.split(jax.random.key(seed % 2**31), 64)
    indices = np.asarray(_index_draws(scheme)(keys, log_weights))
    assert not np.any(zero[indices]), np.unique(indices[zero[indices]])


def test_multinomial_survives_an_exact_zero_uniform():
    # A float32 uniform is exactly 0 with probability 2^-23; -log(u) spacings then turn the
    # sorted uniforms into 0 and NaN and the draw collapses onto the first and last particles.
    # Find keys whose float32 uniform stream holds a zero and check the draw stays spread out.
    n = 4095
    keys = jax.random.split(jax.random.key(3), 4000)
    has_zero = jax.jit(
        jax.vmap(lambda k: jnp.any(jax.random.uniform(k, (n + 1,), jnp.float32) == 0.0))
    )(keys)
    found = np.flatnonzero(np.asarray(has_zero))
    # P(no zero among 4000 keys) = (1 - 2^-23)^(4096 * 4000) ~ exp(-1.95): about 1 in 7; the
    # seed above is one where some keys do (the search is deterministic).
    assert found.size > 0
    particles = jnp.arange(n, dtype=jnp.float32)
    log_weights = jnp.zeros(n, jnp.float32)
    for index in found:
        new_particles, _ = resampling.multinomial()(keys[index], log_weights, particles)
        # Multinomial with uniform weights keeps 1 - (1 - 1/N)^N ~ 63% distinct particles
        # (standard deviation ~ 0.5% of N); a collapse keeps a handful.
        distinct = np.unique(np.asarray(new_particles)).size
        assert distinct > 0.55 * n, distinct
