"""Full whitening on degenerate clouds: no NaN, no crash, finite gradients, float32 and float64.

Rank-deficient clouds (collinear particles, a collapsed coordinate, d >= N) have a singular
correlation matrix, which rounding can make indefinite; the Cholesky factor would then be NaN.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_diffres import resampling

FULL = resampling.diffusion(covariance="full", num_steps=4)
DIAGONAL = resampling.diffusion(covariance="diagonal", num_steps=4)


def _cloud(case, rng):
    """`(particles, log_weights)` as float64 numpy arrays."""
    if case == "collinear_2d":
        n, base = 256, rng.standard_normal((256, 1))
        particles = np.concatenate([base, 3.0 * base + 1.0], axis=1)
    elif case == "rank1_d16":
        n = 512
        particles = rng.standard_normal((n, 1)) @ rng.standard_normal((1, 16))
        particles = particles * 10.0 ** rng.uniform(-3, 3, 16) + rng.standard_normal(16)
    elif case == "rank2_d32":
        n = 256
        particles = rng.standard_normal((n, 2)) @ rng.standard_normal((2, 32)) + 1.0
    elif case == "collapsed_coordinate":
        n = 128
        particles = rng.standard_normal((n, 3))
        particles[:, 1] = 5.0
    elif case == "d_above_n":
        n = 8
        particles = rng.standard_normal((n, 20))
    elif case == "rank3_d64_n64":
        n = 64
        particles = rng.standard_normal((n, 3)) @ rng.standard_normal((3, 64))
    elif case == "scales_1e-20_1e20":
        n = 128
        particles = rng.standard_normal((n, 2)) @ np.array([[1.0, 0.6], [0.0, 0.8]])
        particles = particles * np.array([1e-20, 1e20])
    elif case == "tiny_1e-20":
        n = 128
        particles = 1e-20 * rng.standard_normal((n, 3))
    elif case == "huge_1e20":
        n = 128
        particles = 1e20 * (rng.standard_normal((n, 3)) @ rng.standard_normal((3, 3)))
    else:
        raise AssertionError(case)
    return particles, 0.3 * rng.standard_normal(n)


CASES = (
    "collinear_2d",
    "rank1_d16",
    "rank2_d32",
    "collapsed_coordinate",
    "d_above_n",
    "rank3_d64_n64",
    "scales_1e-20_1e20",
    "tiny_1e-20",
    "huge_1e20",
)


@functools.cache
def _value_and_grad(resampler):
    def expectation(log_weights, particles, key, scale):
        new_particles, new_log_weights = resampler(key, log_weights, particles)
        values = jnp.sum(jnp.sin(new_particles / scale), axis=1)
        return jnp.sum(jnp.exp(new_log_weights) * values), new_particles

    return jax.jit(jax.value_and_grad(expectation, argnums=(0, 1), has_aux=True))


def _run(resampler, case, dtype):
    particles, log_weights = _cloud(case, np.random.default_rng(CASES.index(case)))
    scale = np.maximum(particles.std(axis=0), 1e-30)
    (value, new_particles), gradients = _value_and_grad(resampler)(
        jnp.asarray(log_weights, dtype),
        jnp.asarray(particles, dtype),
        jax.random.key(CASES.index(case)),
        jnp.asarray(scale, dtype),
    )
    return particles, float(value), np.asarray(new_particles, np.float64), gradients


@pytest.mark.fixed_precision
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_full_whitening_survives_degenerate_clouds(case, dtype_name):
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        particles, value, new_particles, gradients = _run(FULL, case, dtype)
        assert new_particles.shape == particles.shape
        assert np.all(np.isfinite(new_particles)), case
        assert math.isfinite(value)
        for gradient in gradients:
            assert gradient.dtype == dtype
            assert np.all(np.isfinite(np.asarray(gradient))), case
        # The output stays within the input's range (up to the start's Gaussian tails):
        # |X* - mean| <= 10 spread per coordinate, where a NaN-free but broken factor (a huge
        # or garbage Cholesky) would throw particles far away.
        # Plus the rounding of the values themselves (a collapsed coordinate keeps its value
        # only up to a few ulps).
        spread = np.ptp(particles, axis=0)
        center = particles.mean(axis=0)
        rounding = 16 * float(np.finfo(dtype).eps) * np.abs(center)
        deviation = np.abs(new_particles - center)
        # A cloud narrower than the whitening scale's documented absolute floor
        # (tiny^(1/4), `whitening_scale`) counts as collapsed: it scatters at the floor.
        floor = float(np.finfo(dtype).tiny) ** 0.25
        assert np.all(deviation <= 10.0 * np.maximum(spread, floor) + rounding), case


@pytest.mark.fixed_precision
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_full_whitening_keeps_a_collinear_cloud_on_its_line(dtype_name):
    # The full factor maps the degenerate direction to (floor + shrinkage)^(1/2) of the scale
    # (the floor against rounding, the ESS shrinkage d / (ESS + d) of `diffusion`), so the
    # output stays on the line y = 3x + 1 up to about that times the spread; diagonal
    # whitening starts from N(0, I), leaves part of the start's spread across the line and so
    # must fail this check (the canary below).
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        _, _, new_particles, _ = _run(FULL, "collinear_2d", dtype)
        residual = np.abs(new_particles[:, 1] - 3.0 * new_particles[:, 0] - 1.0)
        n, d = 256, 2
        eps = float(np.finfo(dtype).eps)
        floor = max(FULL.jitter, 4.0 * d * math.sqrt(n) * eps)
        _, log_weights = _cloud("collinear_2d", np.random.default_rng(0))
        weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
        floor += d / (1.0 / np.sum(weights**2) + d)
        # y's spread is 3; |z| <= 6 for 256 standard normal starts (probability 1 - 1e-6),
        # and the integrator never grows the degenerate coordinate (factor < 1 per step);
        # plus the float rounding of y = 3x + 1 itself.
        bound = 3.0 * 6.0 * math.sqrt(floor) + 64 * eps * np.abs(new_particles[:, 1]).max()
        assert residual.max() <= bound, (residual.max(), bound)
        _, _, diagonal_particles, _ = _run(DIAGONAL, "collinear_2d", dtype)
        diagonal_residual = np.abs(diagonal_particles[:, 1] - 3.0 * diagonal_particles[:, 0] - 1)
        assert diagonal_residual.max() > bound, diagonal_residual.max()


@pytest.mark.fixed_precision
def test_float32_rank_deficient_cloud_needs_the_floor():
    # Canary for the dtype-aware floor: the plain relative jitter 1e-6 is below the rounding
    # error of the float32 correlation matrix of this rank-2, d = 32 cloud, whose Cholesky
    # factor is then NaN; the resampler itself must still be finite (test above).
    particles, log_weights = _cloud("rank2_d32", np.random.default_rng(CASES.index("rank2_d32")))
    x = jnp.asarray(particles, jnp.float32)
    weights = jax.nn.softmax(jnp.asarray(log_weights, jnp.float32))
    centered = x - weights @ x
    standardized = centered / jnp.sqrt(weights @ centered**2 * (1 + FULL.jitter))
    correlation = (standardized * weights[:, None]).T @ standardized
    plain = jnp.linalg.cholesky(correlation + FULL.jitter * jnp.eye(32))
    assert not np.all(np.isfinite(np.asarray(plain)))
