"""Diffusion resampling: moments under uniform weights, exact gradients against finite
differences (float64), the reverse-SDE discretisation bias, and full versus diagonal whitening."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_diffres import resampling

CONFIGURATIONS = {
    "exponential_ode_diagonal": resampling.diffusion(),
    "euler_ode_full": resampling.diffusion(integrator="euler", covariance="full"),
}
# Same derivation as in test_moments.py: RMS of standardised errors of a resampler as accurate
# as multinomial is about 1, and P(chi^2_m / m > 2.5^2) < 1e-4 for the m >= 4 terms pooled here.
MAX_RMS_Z = 2.5


@functools.cache
def _vmapped(resampler):
    return jax.jit(jax.vmap(resampler))


def _moments(particles):
    mean = particles.mean(axis=1)
    centred = particles - mean[:, None, :]
    return mean, (centred**2).mean(axis=1), (centred**4).mean(axis=1)


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_uniform_weights_keep_input_moments(name):
    repeats, n = 16, 512
    rng = np.random.default_rng(3)
    # Non-Gaussian on purpose: a bimodal first coordinate and a skewed second one.
    modes = rng.choice([-2.0, 2.0], size=(repeats, n))
    particles = np.stack(
        [modes + 0.5 * rng.standard_normal((repeats, n)), rng.exponential(size=(repeats, n))],
        axis=-1,
    )
    keys = jax.random.split(jax.random.key(3), repeats)
    new_particles, new_log_weights = _vmapped(CONFIGURATIONS[name])(
        keys, jnp.zeros((repeats, n)), jnp.asarray(particles)
    )
    new_particles = np.asarray(new_particles, np.float64)
    np.testing.assert_allclose(np.asarray(new_log_weights), -math.log(n), rtol=1e-6)
    mean_in, variance_in, fourth_in = _moments(particles)
    mean_out, variance_out, _ = _moments(new_particles)
    # Standardised by the Monte Carlo error of multinomial resampling of the same cloud.
    z_mean = (mean_out - mean_in) / np.sqrt(variance_in / n)
    z_variance = (variance_out - variance_in) / np.sqrt((fourth_in - variance_in**2) / n)
    print(
        f"{name}: RMS z mean {np.sqrt(np.mean(z_mean**2)):.3f}, "
        f"variance {np.sqrt(np.mean(z_variance**2)):.3f}"
    )
    assert np.sqrt(np.mean(z_mean**2)) <= MAX_RMS_Z, z_mean
    assert np.sqrt(np.mean(z_variance**2)) <= MAX_RMS_Z, z_variance


def _sde_variance_factor(integrator, num_steps, time, rate):
    """Output variance of the reverse SDE for a Gaussian cloud in the N -> infinity limit.

    Whitened, the cloud is N(0, I), the ensemble score tends to -z and one step is
    z <- a z + b eps, so the variance follows v <- a^2 v + b^2 from v = 1 (the ODE has a = 1,
    b = 0: exact). The exponential integrator treats only +lambda z exactly and freezes the
    score, so neither scheme is exact: the bias is O(lambda time / num_steps).
    """
    h = rate * time / num_steps
    if integrator == "exponential":
        a, b_squared = 2.0 - math.exp(h), math.expm1(2.0 * h)
    else:
        a, b_squared = 1.0 - h, 2.0 * h
    variance = 1.0
    for _ in range(num_steps):
        variance = a * a * variance + b_squared
    return variance


@pytest.mark.parametrize("integrator", ["exponential", "euler"])
def test_reverse_sde_variance_matches_its_discretisation_bias(integrator):
    # Why the SDE variants are not in the consistency tests of test_moments.py: with few steps
    # their output variance is inflated by the integrator's bias, which for a Gaussian cloud
    # is known exactly in the N -> infinity limit. K = 4 makes that bias large next to the
    # finite-N error of the ensemble score at N = 2048.
    repeats, n, num_steps = 4, 2048, 4
    resampler = resampling.diffusion(num_steps=num_steps, integrator=integrator, ode=False)
    rng = np.random.default_rng(4)
    particles = rng.standard_normal((repeats, n, 1))
    log_weights = -0.5 * (particles[..., 0] - 1.0) ** 2
    keys = jax.random.split(jax.random.key(4), repeats)
    new_particles, _ = _vmapped(resampler)(keys, jnp.asarray(log_weights), jnp.asarray(particles))
    weights = np.exp(log_weights - log_weights.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    mean_in = np.einsum("rn,rn->r", weights, particles[..., 0])
    variance_in = np.einsum("rn,rn->r", weights, (particles[..., 0] - mean_in[:, None]) ** 2)
    ratio = np.asarray(new_particles, np.float64)[..., 0].var(axis=1) / variance_in
    expected = _sde_variance_factor(integrator, num_steps, 1.0, 1.0)
    # Monte Carlo standard error of a Gaussian sample variance ratio, sqrt(2 / N) per cloud,
    # averaged over the repeats; four standard errors.
    tolerance = 4.0 * expected * math.sqrt(2.0 / n) / math.sqrt(repeats)
    print(f"{integrator} SDE: variance ratio {ratio.mean():.4f}, predicted {expected:.4f}")
    assert abs(ratio.mean() - expected) <= tolerance, (ratio, expected)
    # The bias is real and well beyond the Monte Carlo error (the ODE default has none).
    assert expected - 1.0 > tolerance


GRADIENT_CONFIGURATIONS = {
    "exponential_ode_diagonal": dict(num_steps=4),
    "euler_sde_full": dict(num_steps=4, integrator="euler", ode=False, covariance="full"),
}


@pytest.mark.parametrize("name", GRADIENT_CONFIGURATIONS)
@pytest.mark.fixed_precision
def test_gradients_match_central_finite_differences(name):
    n, d = 12, 2
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        resampler = resampling.diffusion(**GRADIENT_CONFIGURATIONS[name])
        key = jax.random.key(5)
        particles = jnp.asarray(rng.standard_normal((n, d)) * [1.0, 2.0])
        log_weights = jnp.asarray(rng.standard_normal(n))

        def expectation(log_weights, particles):
            new_particles, new_log_weights = resampler(key, log_weights, particles)
            values = jnp.sum(jnp.sin(new_particles) + 0.1 * new_particles**2, axis=1)
            return jnp.sum(jnp.exp(new_log_weights) * values)

        value_fn = jax.jit(expectation)
        grad_log_weights, grad_particles = jax.jit(jax.grad(expectation, argnums=(0, 1)))(
            log_weights, particles
        )
        assert grad_log_weights.dtype == jnp.float64
        assert np.all(np.isfinite(grad_log_weights)) and np.all(np.isfinite(grad_particles))
        assert np.any(grad_log_weights != 0) and np.any(grad_particles != 0)
        # Central differences at the same key: truncation h^2/6 |f'''| ~ 1e-10 and rounding
        # eps |f| / h ~ 1e-11 for h = 1e-5, so rtol = 1e-6 leaves four orders of margin for
        # the curvature of the transport map while catching any wrong or missing term.
        h = 1e-5
        for direction_index in range(3):
            direction_rng = np.random.default_rng(50 + direction_index)
            dl = jnp.asarray(direction_rng.standard_normal(n))
            dx = jnp.asarray(direction_rng.standard_normal((n, d)))
            finite_difference = (
                value_fn(log_weights + h * dl, particles + h * dx)
                - value_fn(log_weights - h * dl, particles - h * dx)
            ) / (2.0 * h)
            directional = jnp.sum(grad_log_weights * dl) + jnp.sum(grad_particles * dx)
            np.testing.assert_allclose(directional, finite_difference, rtol=1e-6, atol=1e-9)


def test_full_covariance_beats_diagonal_on_correlated_target():
    repeats, n = 8, 512
    rng = np.random.default_rng(7)
    correlation = 0.95
    scales = np.array([1.0, 3.0])
    covariance = correlation * np.outer(scales, scales) + (1 - correlation) * np.diag(scales**2)
    particles = rng.standard_normal((repeats, n, 2)) @ np.linalg.cholesky(covariance).T
    # Uniform weights, so the comparison measures the whitening and not importance noise.
    log_weights = np.zeros((repeats, n))
    covariance_in = np.stack([np.cov(cloud.T, bias=True) for cloud in particles])
    keys = jax.random.split(jax.random.key(7), repeats)
    errors = {}
    for whitening in ("diagonal", "full"):
        resampler = resampling.diffusion(covariance=whitening)
        new_particles, _ = _vmapped(resampler)(
            keys, jnp.asarray(log_weights), jnp.asarray(particles)
        )
        new_particles = np.asarray(new_particles, np.float64)
        covariance_out = np.stack([np.cov(cloud.T, bias=True) for cloud in new_particles])
        # Error in the input's own whitened coordinates, |L^-1 C_out L^-T - I|_F with
        # C_in = L L^T: affine invariant, so the thin direction of the correlated cloud counts
        # as much as the wide one (a plain Frobenius norm is dominated by the wide variance).
        inverse_factor = np.linalg.inv(np.linalg.cholesky(covariance_in))
        whitened = inverse_factor @ covariance_out @ np.swapaxes(inverse_factor, 1, 2)
        errors[whitening] = np.linalg.norm(whitened - np.eye(2), axis=(1, 2))
    difference = errors["diagonal"] - errors["full"]
    standard_error = difference.std(ddof=1) / math.sqrt(repeats)
    print(
        f"whitened covariance error: diagonal {errors['diagonal'].mean():.4f}, "
        f"full {errors['full'].mean():.4f} (paired difference {difference.mean():.4f} "
        f"+- {standard_error:.4f})"
    )
    # Paired over the same clouds and keys; three standard errors of the mean difference.
    assert difference.mean() > 3.0 * standard_error


@pytest.mark.parametrize("ode", [True, False])
def test_from_noise_is_the_key_map_on_the_normals_the_key_draws(ode):
    # The key only draws the start (and the SDE's step noises): the same normals give the same
    # output, and the noise-driven form keeps the traits and says it takes noise.
    resampler = resampling.diffusion(num_steps=3, ode=ode, covariance="full")
    log_weights = jax.random.normal(jax.random.PRNGKey(0), (16,))
    particles = jax.random.normal(jax.random.PRNGKey(1), (16, 2, 2))
    key = jax.random.PRNGKey(2)
    start_key, steps_key = jax.random.split(key)
    noise = jax.random.normal(start_key, (16, 4))
    if not ode:
        steps = jax.random.normal(steps_key, (3, 16, 4))
        noise = jnp.concatenate([noise[None], steps])
    assert noise.shape == resampler.noise_shape(16, (2, 2))
    driven = resampling.noise_driven(resampler)
    assert driven.takes_noise and driven.moves_particles and not driven.has_ancestors
    expected = resampler(key, log_weights, particles)
    np.testing.assert_array_equal(driven(noise, log_weights, particles)[0], expected[0])
    np.testing.assert_array_equal(
        resampler.from_noise(noise, log_weights, particles)[1], expected[1]
    )
    with pytest.raises(ValueError, match="takes standard normals of shape"):
        driven(noise[..., :3], log_weights, particles)
