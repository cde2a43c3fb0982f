"""The particle filter against exact Kalman likelihoods (float64 throughout this module)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from numpyro_diffres import resampling

T = 50


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def scalar_params(phi=0.9, log_q=math.log(0.7), log_r=math.log(0.5)):
    q, r = jnp.exp(log_q), jnp.exp(log_r)
    eye = jnp.eye(1)
    return ndr.LinearGaussianParams(jnp.zeros(1), eye, phi * eye, q**2 * eye, eye, r**2 * eye)


def vector_params():
    transition = jnp.array([[0.8, 0.1, 0.0], [0.0, 0.7, 0.2], [0.1, 0.0, 0.6]])
    emission = jnp.array([[1.0, 0.5, 0.0], [0.0, 0.3, 1.0]])
    return ndr.LinearGaussianParams(
        jnp.zeros(3), jnp.eye(3), transition, 0.5 * jnp.eye(3), emission, 0.4 * jnp.eye(2)
    )


def data(params, num_steps=T, seed=0):
    _, observations = ndr.simulate(jax.random.PRNGKey(seed), ndr.linear_gaussian(params), num_steps)
    return observations


def log_likelihoods(params, observations, num_particles, resampler, seeds, ess_threshold=1.0):
    model = ndr.linear_gaussian(params)

    @jax.jit
    @jax.vmap
    def run(key):
        return ndr.particle_filter(
            key,
            model,
            observations,
            num_particles=num_particles,
            resampler=resampler,
            ess_threshold=ess_threshold,
        ).log_likelihood

    return run(jax.random.split(jax.random.PRNGKey(1), seeds))


@pytest.mark.parametrize("ess_threshold", [1.0, 0.5])
@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
@pytest.mark.parametrize("make_params", [scalar_params, vector_params], ids=["1d", "3d"])
def test_index_resampling_likelihood_is_unbiased(make_params, scheme, ess_threshold):
    # The PF estimate of Z (not log Z) is unbiased: mean of Zhat / Z is 1 within 5 standard
    # errors. A log N normalisation slip moves this ratio by a factor of N.
    params = make_params()
    observations = data(params)
    exact = ndr.kalman_log_likelihood(params, observations)
    estimates = log_likelihoods(
        params, observations, 256, getattr(resampling, scheme)(), 64, ess_threshold
    )
    ratio = np.exp(np.asarray(estimates - exact))
    standard_error = ratio.std(ddof=1) / math.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < 5 * standard_error + 1e-12


def counting_model(phi=0.9):
    """AR(1) in the first coordinate; the second only counts resampling events (see below)."""
    return ndr.StateSpaceModel(
        initial=dist.Normal(jnp.zeros(2), jnp.array([1.0, 1e-9])).to_event(1),
        transition=lambda x, t: dist.Normal(
            jnp.stack([phi * x[0], x[1]]), jnp.array([0.7, 1e-9])
        ).to_event(1),
        emission=lambda x, t: dist.Normal(x[:1], 0.5).to_event(1),
    )


def counting(resampler):
    """Adds 1 to every particle's counter coordinate whenever it resamples."""

    def resample(key, log_weights, particles):
        new_particles, new_log_weights = resampler(key, log_weights, particles)
        return new_particles.at[:, 1].add(1.0), new_log_weights

    return resample


@pytest.mark.parametrize("ess_threshold", [0.0, 0.5, 1.0])
def test_ess_triggered_resampling_resamples_when_the_ess_is_low(ess_threshold):
    n = 64
    _, observations = ndr.simulate(jax.random.PRNGKey(0), counting_model(), T)
    result = ndr.particle_filter(
        jax.random.PRNGKey(0),
        counting_model(),
        observations,
        num_particles=n,
        resampler=counting(resampling.systematic()),
        ess_threshold=ess_threshold,
    )
    resamplings = round(float(result.filtered_mean[-1, 1]))
    # Step t resamples iff the ESS after observing y_{t-1} is below the threshold.
    expected = int(np.sum(np.asarray(result.ess[:-1]) < ess_threshold * n))
    if ess_threshold == 1.0:
        expected = T - 1
    assert resamplings == expected
    if ess_threshold == 0.5:
        # Neither never nor always: the policy actually switches on this run.
        assert 0 < resamplings < T - 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_params", "seeds"), [(scalar_params, 16), (vector_params, 8)], ids=["1d", "3d"]
)
def test_diffusion_bias_shrinks_with_particles(make_params, seeds):
    params = make_params()
    observations = data(params)
    exact = float(ndr.kalman_log_likelihood(params, observations))
    small = log_likelihoods(params, observations, 64, resampling.diffusion(), seeds)
    large = log_likelihoods(params, observations, 1024, resampling.diffusion(), seeds)
    bias_small = abs(float(small.mean()) - exact)
    bias_large = abs(float(large.mean()) - exact)
    # The large-N bias must be below the small-N bias by more than both Monte Carlo errors.
    noise = 3 * (float(small.std()) + float(large.std())) / math.sqrt(seeds)
    assert bias_large + noise < bias_small, (bias_small, bias_large, noise)


@pytest.mark.slow
def test_missing_observations_match_the_model_without_them():
    params = scalar_params()
    observations = data(params, 30)
    observations = observations.at[jnp.array([0, 7, 8, 20])].set(jnp.nan)
    exact = ndr.dense_log_likelihood(params, observations)
    # Dropping rows must differ from the full-data value, or this test could not fail.
    assert abs(float(exact - ndr.dense_log_likelihood(params, data(params, 30)))) > 1.0
    estimates = log_likelihoods(params, observations, 256, resampling.systematic(), 64)
    ratio = np.exp(np.asarray(estimates - exact))
    assert abs(ratio.mean() - 1.0) < 5 * ratio.std(ddof=1) / math.sqrt(ratio.size)
    diffusion = log_likelihoods(params, observations, 256, resampling.diffusion(), 16)
    assert np.all(np.isfinite(diffusion))
    assert abs(float(diffusion.mean() - exact)) < 1.0


THETA = jnp.array([0.9, math.log(0.7), math.log(0.5)])


def gradient_estimates(resampler, num_particles, seeds, observations):
    def log_likelihood(theta, key):
        model = ndr.linear_gaussian(scalar_params(*theta))
        return ndr.particle_filter(
            key, model, observations, num_particles=num_particles, resampler=resampler
        ).log_likelihood

    run = jax.jit(jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0)))
    return np.asarray(run(THETA, jax.random.split(jax.random.PRNGKey(2), seeds)))


@pytest.fixture(scope="module")
def gradient_problem():
    with jax.enable_x64(True):
        observations = data(scalar_params())
        exact = jax.grad(
            lambda theta: ndr.kalman_log_likelihood(scalar_params(*theta), observations)
        )(THETA)
        return observations, np.asarray(exact)


@pytest.mark.slow
def test_diffusion_gradient_approaches_kalman_gradient(gradient_problem):
    observations, exact = gradient_problem
    errors = {}
    for num_particles in (32, 256):
        grads = gradient_estimates(resampling.diffusion(), num_particles, 32, observations)
        assert np.all(np.isfinite(grads))
        errors[num_particles] = np.linalg.norm(grads.mean(0) - exact) / np.linalg.norm(exact)
    assert errors[256] < 0.5 * errors[32], errors
    assert errors[256] < 0.1, errors


@pytest.mark.slow
def test_stop_gradient_matches_and_naive_autodiff_is_biased(gradient_problem):
    observations, exact = gradient_problem
    seeds = 64
    stop = gradient_estimates(resampling.stop_gradient(), 256, seeds, observations)
    naive = gradient_estimates(resampling.systematic(), 256, seeds, observations)
    stop_se = stop.std(0, ddof=1) / math.sqrt(seeds)
    naive_se = naive.std(0, ddof=1) / math.sqrt(seeds)
    assert np.all(np.abs(stop.mean(0) - exact) < 5 * stop_se + 0.02 * np.abs(exact))
    # Canary: autodiff through index resampling drops the dependence of the ancestors on the
    # parameters; its gradient is off by far more than its Monte Carlo error.
    assert np.abs(naive.mean(0) - exact)[0] > 10 * naive_se[0]


def fixed_key_slice(resampler, num_particles=128, num_points=41):
    params = scalar_params()
    observations = data(params)
    # A fine grid: neighbouring exact values differ by about 0.01, so jumps stand out.
    phis = jnp.linspace(0.895, 0.905, num_points)

    @jax.jit
    @jax.vmap
    def run(phi):
        model = ndr.linear_gaussian(scalar_params(phi))
        return ndr.particle_filter(
            jax.random.PRNGKey(3),
            model,
            observations,
            num_particles=num_particles,
            resampler=resampler,
        ).log_likelihood

    exact = jax.vmap(lambda phi: ndr.kalman_log_likelihood(scalar_params(phi), observations))(phis)
    return np.asarray(run(phis)), np.asarray(exact)


def test_diffusion_surface_is_smooth_and_systematic_is_not():
    diffusion, exact = fixed_key_slice(resampling.diffusion())
    systematic, _ = fixed_key_slice(resampling.systematic())
    roughness = {
        name: np.median(np.abs(np.diff(values)))
        for name, values in [("exact", exact), ("diffusion", diffusion), ("systematic", systematic)]
    }
    # The exact curve's neighbouring differences set the scale of a smooth surface.
    assert roughness["diffusion"] < 3 * roughness["exact"], roughness
    assert roughness["systematic"] > 10 * roughness["exact"], roughness
    # Second differences expose jumps that the median of first differences might average out.
    assert np.max(np.abs(np.diff(diffusion, 2))) < 10 * np.max(np.abs(np.diff(exact, 2))) + 1e-3


def test_simulate_has_the_stationary_variance_of_an_ar1():
    phi, q = 0.8, 0.5
    stationary = q**2 / (1 - phi**2)
    model = ndr.StateSpaceModel(
        dist.Normal(0.0, math.sqrt(stationary)),
        lambda x, t: dist.Normal(phi * x, q),
        lambda x, t: dist.Normal(x, 1.0),
    )
    states, observations = jax.vmap(lambda k: ndr.simulate(k, model, 20))(
        jax.random.split(jax.random.PRNGKey(0), 2000)
    )
    assert states.shape == (2000, 20) and observations.shape == (2000, 20)
    variance = np.asarray(states.var(0))
    # The variance of a sample variance over 2000 draws is about 2 sigma^4 / 2000.
    tolerance = 5 * math.sqrt(2 / 2000) * stationary
    np.testing.assert_allclose(variance, stationary, atol=tolerance)
    lag1 = np.mean(np.asarray(states[:, 1:] * states[:, :-1])) / stationary
    assert abs(lag1 - phi) < 0.05
    np.testing.assert_allclose(np.asarray(observations.var(0)).mean(), stationary + 1.0, rtol=0.1)


def test_filtered_moments_match_kalman():
    params = vector_params()
    observations = data(params)
    means, covariances = ndr.kalman_filtered_moments(params, observations)
    seeds = 16
    run = jax.jit(
        jax.vmap(
            lambda k: ndr.particle_filter(
                k,
                ndr.linear_gaussian(params),
                observations,
                num_particles=512,
                resampler=resampling.systematic(),
            )
        )
    )
    result = run(jax.random.split(jax.random.PRNGKey(0), seeds))
    variances = jnp.diagonal(covariances, axis1=1, axis2=2)
    assert result.filtered_mean.shape == (seeds, T, 3) and result.ess.shape == (seeds, T)
    # Tolerance from the spread over seeds: 5 standard errors of the seed average, plus the
    # bias of a self-normalised estimate, of relative order 1/ESS (allow 3/ESS).
    bias = 3.0 * variances / result.ess.mean(0)[:, None]
    for estimate, exact in [(result.filtered_mean, means), (result.filtered_variance, variances)]:
        standard_error = estimate.std(0, ddof=1) / math.sqrt(seeds)
        error = jnp.abs(estimate.mean(0) - exact)
        assert jnp.all(error < 5 * standard_error + bias)
    np.testing.assert_allclose(
        result.log_likelihood_increments.sum(1), result.log_likelihood, rtol=1e-12
    )


@pytest.mark.parametrize(
    "emission",
    [
        lambda x, t: dist.Poisson(jnp.exp(x)),
        lambda x, t: dist.StudentT(3.0, x, 0.5),
    ],
    ids=["poisson", "student-t"],
)
def test_non_gaussian_emissions_agree_across_resamplers(emission):
    model = ndr.StateSpaceModel(
        dist.Normal(0.0, 1.0), lambda x, t: dist.Normal(0.9 * x, 0.3), emission
    )
    _, observations = ndr.simulate(jax.random.PRNGKey(0), model, 30)

    def estimates(resampler, num_particles, seeds):
        run = jax.jit(
            jax.vmap(
                lambda k: (
                    ndr.particle_filter(
                        k, model, observations, num_particles=num_particles, resampler=resampler
                    ).log_likelihood
                )
            )
        )
        return np.asarray(run(jax.random.split(jax.random.PRNGKey(5), seeds)))

    reference = estimates(resampling.systematic(), 2048, 16)
    diffusion = estimates(resampling.diffusion(), 256, 16)
    assert np.all(np.isfinite(diffusion))
    spread = reference.std() + diffusion.std()
    assert abs(diffusion.mean() - reference.mean()) < 5 * spread / 4 + 0.5


def test_guided_proposal_with_the_optimal_proposal_is_exactly_weighted():
    # For y_t = x_t + noise the locally optimal proposal is Gaussian; using it, the weight
    # correction log f - log q + log g must reproduce the Kalman likelihood without bias.
    phi, q, r = 0.9, 0.7, 0.5
    params = scalar_params(phi, math.log(q), math.log(r))
    observations = data(params)
    gain = q**2 / (q**2 + r**2)
    proposal_scale = math.sqrt(q**2 * r**2 / (q**2 + r**2))

    def proposal(x, t, y):
        mean = phi * x + gain * (y - phi * x)
        return dist.MultivariateNormal(mean, proposal_scale**2 * jnp.eye(1))

    base = ndr.linear_gaussian(params)
    guided = ndr.StateSpaceModel(base.initial, base.transition, base.emission, proposal)
    run = jax.jit(
        jax.vmap(
            lambda k: (
                ndr.particle_filter(
                    k, guided, observations, num_particles=64, resampler=resampling.systematic()
                ).log_likelihood
            )
        )
    )
    estimates = np.asarray(run(jax.random.split(jax.random.PRNGKey(0), 64)))
    exact = float(ndr.kalman_log_likelihood(params, observations))
    ratio = np.exp(estimates - exact)
    assert abs(ratio.mean() - 1) < 5 * ratio.std(ddof=1) / 8
    bootstrap = log_likelihoods(params, observations, 64, resampling.systematic(), 64)
    # A better proposal must lower the variance of the estimate.
    assert estimates.std() < np.asarray(bootstrap).std()


# --- single-precision particles --------------------------------------------------------------


def cast_params(params, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


@pytest.fixture(scope="module")
def precision_problem():
    with jax.enable_x64(True):
        params = vector_params()
        observations = data(params, num_steps=20)

        @functools.partial(jax.jit, static_argnums=2)
        def value_and_grad(scale, key, single):
            def log_likelihood(scale):
                dtype = jnp.float32 if single else jnp.float64
                # float32 single runs: parameters and data in float32 too, so every density is
                # evaluated in single precision; the states are rounded by `dtype`.
                scaled = cast_params(
                    params._replace(transition_matrix=scale * params.transition_matrix), dtype
                )
                return ndr.particle_filter(
                    key,
                    ndr.linear_gaussian(scaled),
                    observations.astype(dtype),
                    num_particles=32,
                    resampler=resampling.diffusion(num_steps=4),
                    dtype=dtype,
                ).log_likelihood.astype(jnp.float64)

            return jax.value_and_grad(log_likelihood)(scale)

        yield params, observations, value_and_grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_particles_give_the_float64_likelihood_with_the_same_key(precision_problem, seed):
    # With x64 enabled, every random draw is made in float64 and rounded, so the float32 run
    # differs from the float64 run by rounding error only (Monte Carlo noise alone is about
    # 1e-2 relative here: see `test_float32_differs_by_monte_carlo_noise_across_keys`).
    _, _, value_and_grad = precision_problem
    key = jax.random.PRNGKey(seed)
    single, single_grad = value_and_grad(jnp.asarray(1.0), key, True)
    double, double_grad = value_and_grad(jnp.asarray(1.0), key, False)
    assert abs(float(single) / float(double) - 1) < 1e-5
    np.testing.assert_allclose(float(single_grad), float(double_grad), rtol=1e-3)


def test_float32_differs_by_monte_carlo_noise_across_keys(precision_problem):
    # The check above would be empty if the likelihood did not depend on the key.
    _, _, value_and_grad = precision_problem
    first = float(value_and_grad(jnp.asarray(1.0), jax.random.PRNGKey(0), False)[0])
    second = float(value_and_grad(jnp.asarray(1.0), jax.random.PRNGKey(1), False)[0])
    assert abs(first / second - 1) > 1e-4


def test_float32_particles_with_float64_parameters_keep_float64_weights(precision_problem):
    # Mixed precision: states (and the resampler) in float32, densities in float64.
    params, observations, _ = precision_problem
    model = ndr.linear_gaussian(params)
    key = jax.random.PRNGKey(0)
    mixed = ndr.particle_filter(key, model, observations, num_particles=16, dtype=jnp.float32)
    double = ndr.particle_filter(key, model, observations, num_particles=16)
    assert mixed.filtered_mean.dtype == jnp.float64
    assert mixed.log_likelihood.dtype == jnp.float64
    assert mixed.log_likelihood != double.log_likelihood
    assert abs(float(mixed.log_likelihood) / float(double.log_likelihood) - 1) < 1e-5
