"""The explicit-noise filter: unbiasedness, draws from noise, sorted systematic resampling, and
diffusion resampling driven by the noise (smooth in it: pseudo-marginal HMC)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from numpyro_diffres.noise import FilterNoise, noise_filter, noise_shape
from numpyro_diffres.noise_draws import draw_from_noise
from numpyro_diffres.resampling.sorted import sorted_ancestors


def ar1(phi=0.8):
    return ndr.StateSpaceModel(
        dist.Normal(0.0, 1.0),
        lambda x, t: dist.Normal(phi * x, 0.5),
        lambda x, t: dist.Normal(x, 0.3),
    )


def exact(y, phi=0.8):
    eye = jnp.eye(1)
    params = ndr.LinearGaussianParams(jnp.zeros(1), eye, phi * eye, 0.25 * eye, eye, 0.09 * eye)
    return ndr.kalman_log_likelihood(params, y[:, None])


def draw_noise(key, shapes):
    keys = jax.random.split(key, 3)
    return FilterNoise(*(jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)))


@pytest.mark.fixed_precision
def test_the_estimate_is_unbiased():
    with jax.enable_x64(True):
        y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 8)[1]
        shapes = noise_shape(8, 16, ())

        def estimate(key):
            return noise_filter(draw_noise(key, shapes), ar1(), y).log_likelihood

        values = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.PRNGKey(1), 20000))
        ratio = np.exp(np.asarray(values) - float(exact(y)))
        # The likelihood itself (not its log) is estimated without bias.
        error = abs(ratio.mean() - 1.0)
        assert error < 4.0 * ratio.std() / np.sqrt(ratio.size), (ratio.mean(), ratio.std())
        # The canary: the log of the estimate is biased low (Jensen), by far more.
        assert float(exact(y)) - np.mean(values) > 4.0 * np.std(values) / np.sqrt(values.size)


def test_resampling_copies_each_particle_by_its_weight():
    weights = jnp.array([0.05, 0.4, 0.05, 0.3, 0.2])
    particles = jnp.array([3.0, -1.0, 0.5, 2.0, -4.0])
    for uniform in (0.0, 0.37, 0.99):
        ancestors = sorted_ancestors(jnp.asarray(uniform), jnp.log(weights), particles)
        counts = np.bincount(np.asarray(ancestors), minlength=5)
        expected = 5 * np.asarray(weights)
        assert np.all((counts >= np.floor(expected - 1e-6)) & (counts <= np.ceil(expected + 1e-6)))
        # Sorted: ancestors appear in increasing order of the particles' values.
        assert np.all(np.diff(np.asarray(particles[ancestors])) >= 0)


def test_nearby_parameters_give_nearby_estimates():
    # Sorting keeps the estimate continuous-ish in theta for fixed noise; the key-driven
    # filter with the same resampler jumps by O(1) (what correlated PMMH relies on).
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 30)[1]
    noise = draw_noise(jax.random.PRNGKey(2), noise_shape(30, 64, ()))
    phis = jnp.linspace(0.7, 0.72, 21)
    values = jax.vmap(lambda phi: noise_filter(noise, ar1(phi), y).log_likelihood)(phis)
    keyed = jax.vmap(
        lambda phi: (
            ndr.particle_filter(
                jax.random.PRNGKey(2),
                ar1(phi),
                y,
                num_particles=64,
                resampler=ndr.resampling.systematic(),
            ).log_likelihood
        )
    )(phis)
    assert np.max(np.abs(np.diff(values))) < 0.5 * np.max(np.abs(np.diff(keyed)))


@pytest.mark.parametrize(
    ("distribution", "expected"),
    [
        (dist.Normal(1.0, 2.0), lambda u: 1.0 + 2.0 * u),
        (dist.LogNormal(0.5, 0.1), lambda u: jnp.exp(0.5 + 0.1 * u)),
        (dist.Uniform(-1.0, 3.0), lambda u: -1.0 + 4.0 * jax.scipy.stats.norm.cdf(u)),
        (dist.Normal(jnp.zeros(3), 1.0).to_event(1), lambda u: u),
        (dist.Normal(0.0, 2.0).expand((3,)), lambda u: 2.0 * u),
        (
            dist.MultivariateNormal(jnp.ones(2), jnp.array([[4.0, 0.0], [0.0, 1.0]])),
            lambda u: 1.0 + jnp.array([2.0, 1.0]) * u,
        ),
    ],
)
def test_draws_from_noise(distribution, expected):
    u = jax.random.normal(jax.random.PRNGKey(0), distribution.shape())
    np.testing.assert_allclose(draw_from_noise(distribution, u), expected(u), rtol=1e-5)


def test_draws_from_noise_have_the_distribution():
    distribution = dist.Gumbel(1.0, 2.0)
    u = jax.random.normal(jax.random.PRNGKey(0), (20000,))
    draws = draw_from_noise(distribution.expand((20000,)), u)
    np.testing.assert_allclose(draws.mean(), 1.0 + 2.0 * 0.5772, atol=0.05)


def test_a_family_without_noise_draws_is_refused():
    with pytest.raises(TypeError, match="Supported"):
        draw_from_noise(dist.Dirichlet(jnp.ones(3)), jnp.zeros(3))


@pytest.mark.parametrize("resampler", [None, ndr.resampling.diffusion(num_steps=2)])
def test_many_series_match_one_series_each(resampler):
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 12)[1]
    phis = jnp.array([0.5, 0.8, -0.3])
    series = ndr.StateSpaceModel(
        dist.Normal(jnp.zeros(3), 1.0),
        lambda x, t: dist.Normal(phis * x, 0.5),
        lambda x, t: dist.Normal(x, 0.3),
    )
    observations = jnp.stack([y, y + 0.1, y.at[4].set(jnp.nan)])
    noise = draw_noise(jax.random.PRNGKey(3), noise_shape(12, 32, (), (3,), resampler=resampler))
    together = noise_filter(noise, series, observations, resampler=resampler, batch_shape=(3,))
    for s in range(3):
        alone = noise_filter(
            FilterNoise(noise.initial[:, s], noise.transition[:, :, s], noise.resampling[:, s]),
            ar1(phis[s]),
            observations[s],
            resampler=resampler,
        )
        np.testing.assert_allclose(
            together.log_likelihood_increments[s], alone.log_likelihood_increments, rtol=1e-5
        )
        np.testing.assert_allclose(together.filtered_mean[s], alone.filtered_mean, rtol=1e-5)


def test_missing_observations_add_nothing():
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 10)[1]
    noise = draw_noise(jax.random.PRNGKey(3), noise_shape(10, 32, ()))
    result = noise_filter(noise, ar1(), y.at[3].set(jnp.nan))
    assert result.log_likelihood_increments[3] == 0.0
    assert np.isfinite(result.log_likelihood)


def test_guided_proposal_is_corrected():
    # A proposal that is the transition itself must give the bootstrap estimate.
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 10)[1]
    model = ar1()
    guided = ndr.StateSpaceModel(
        model.initial, model.transition, model.emission, lambda x, t, y: model.transition(x, t)
    )
    noise = draw_noise(jax.random.PRNGKey(3), noise_shape(10, 32, ()))
    np.testing.assert_allclose(
        noise_filter(noise, guided, y).log_likelihood,
        noise_filter(noise, model, y).log_likelihood,
        rtol=1e-5,
    )


def test_impossible_parameters_give_minus_infinity_and_zero_gradient():
    # Traced (as under a sampler): a negative scale is weight zero, not NaN.
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 10)[1]
    noise = draw_noise(jax.random.PRNGKey(3), noise_shape(10, 8, ()))

    def log_likelihood(scale):
        broken = ndr.StateSpaceModel(
            dist.Normal(0.0, 1.0),
            lambda x, t: dist.Normal(x, scale),
            lambda x, t: dist.Normal(x, 0.3),
        )
        return noise_filter(noise, broken, y).log_likelihood

    value, gradient = jax.jit(jax.value_and_grad(log_likelihood))(-1.0)
    assert value == -jnp.inf
    assert gradient == 0.0


# --- diffusion resampling driven by the noise --------------------------------------------------


def key_path_noise(key, num_steps, num_particles, resampler):
    """The standard normals `particle_filter(key, ar1(), ...)` draws, as a `FilterNoise`.

    `run_filter` splits the key into the first cloud's and one per later step; each step splits
    its key into the resampler's (diffusion: its start from the first half of a split) and the
    moves' (one key per particle; a normal transition draws loc + scale * normal(key)).
    """
    initial_key, steps_key = jax.random.split(key)
    resampling, transition = [], []
    for step_key in jax.random.split(steps_key, num_steps - 1):
        resample_key, move_key = jax.random.split(step_key)
        start_key, sde_key = jax.random.split(resample_key)
        start = jax.random.normal(start_key, (num_particles, 1))
        if not resampler.ode:
            steps = jax.random.normal(sde_key, (resampler.num_steps, num_particles, 1))
            start = jnp.concatenate([start[None], steps])
        resampling.append(start)
        moves = jax.random.split(move_key, num_particles)
        transition.append(jax.vmap(lambda k: jax.random.normal(k, ()))(moves))
    initial = jax.random.normal(initial_key, (num_particles,))
    return FilterNoise(initial, jnp.stack(transition), jnp.stack(resampling))


@pytest.mark.parametrize("ode", [True, False])
def test_diffusion_noise_filter_is_the_key_filter_on_the_same_normals(ode):
    resampler = ndr.resampling.diffusion(num_steps=3, ode=ode)
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 8)[1]
    key = jax.random.PRNGKey(4)
    noise = key_path_noise(key, 8, 16, resampler)
    assert tuple(map(jnp.shape, noise)) == tuple(noise_shape(8, 16, (), resampler=resampler))
    keyed = ndr.particle_filter(key, ar1(), y, num_particles=16, resampler=resampler)
    driven = noise_filter(noise, ar1(), y, resampler=resampler)
    np.testing.assert_allclose(
        driven.log_likelihood_increments, keyed.log_likelihood_increments, rtol=1e-5
    )
    np.testing.assert_allclose(driven.filtered_mean, keyed.filtered_mean, rtol=1e-5, atol=1e-6)


def test_noise_shape_sizes_the_resampling_noise_from_the_resampler():
    ode = ndr.resampling.diffusion(num_steps=4)
    sde = ndr.resampling.diffusion(num_steps=4, ode=False)
    # Sorted systematic: one normal per series per step (None and systematic() mean it).
    for resampler in (None, ndr.resampling.systematic(), ndr.resampling.sorted_systematic()):
        assert noise_shape(10, 8, (2,), (3,), resampler=resampler).resampling == (9, 3)
    # Diffusion: its start per particle (the state flattened), times K + 1 for the SDE;
    # series first, as the filter indexes every resampler's noise.
    assert noise_shape(10, 8, (2,), resampler=ode).resampling == (9, 8, 2)
    assert noise_shape(10, 8, (2,), (3,), resampler=ode).resampling == (9, 3, 8, 2)
    assert noise_shape(10, 8, (), (3,), resampler=sde).resampling == (9, 3, 5, 8, 1)
    assert noise_shape(10, 8, (2,), resampler=ode).transition == (9, 8, 2)


@pytest.mark.fixed_precision
def test_diffusion_noise_filter_is_smooth_in_the_noise_and_the_parameter():
    # The gradient in (phi, u) is finite, non-zero in every part of u, deterministic, and a
    # directional derivative along a random direction in u matches central differences.
    with jax.enable_x64(True):
        resampler = ndr.resampling.diffusion(num_steps=2)
        y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 10)[1]
        noise = draw_noise(jax.random.PRNGKey(3), noise_shape(10, 8, (), resampler=resampler))

        def log_likelihood(phi, noise):
            return noise_filter(noise, ar1(phi), y, resampler=resampler).log_likelihood

        value_and_grad = jax.jit(jax.value_and_grad(log_likelihood, argnums=(0, 1)))
        value, (phi_gradient, noise_gradient) = value_and_grad(0.8, noise)
        assert value == value_and_grad(0.8, noise)[0]
        assert np.isfinite(phi_gradient) and phi_gradient != 0.0
        for field, gradient in zip(FilterNoise._fields, noise_gradient, strict=True):
            assert np.all(np.isfinite(gradient)), field
            assert np.any(gradient != 0.0), field
        direction = draw_noise(jax.random.PRNGKey(5), noise_shape(10, 8, (), resampler=resampler))
        step = 1e-5
        shifted = [
            jax.tree.map(lambda u, v, sign=sign: u + sign * step * v, noise, direction)
            for sign in (1.0, -1.0)
        ]
        difference = (log_likelihood(0.8, shifted[0]) - log_likelihood(0.8, shifted[1])) / (
            2 * step
        )
        directional = sum(jnp.vdot(g, v) for g, v in zip(noise_gradient, direction, strict=True))
        np.testing.assert_allclose(directional, difference, rtol=1e-5)


def test_noise_filter_refuses_a_resampler_without_noise_and_noise_of_another_shape():
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 6)[1]
    noise = draw_noise(jax.random.PRNGKey(3), noise_shape(6, 8, ()))
    with pytest.raises(ValueError, match="no such form"):
        noise_filter(noise, ar1(), y, resampler=ndr.resampling.multinomial())
    with pytest.raises(ValueError, match=r"noise.resampling must have shape \(5, 8, 1\)"):
        noise_filter(noise, ar1(), y, resampler=ndr.resampling.diffusion())


def test_a_key_for_a_noise_resampler_is_refused():
    y = ndr.simulate(jax.random.PRNGKey(0), ar1(), 6)[1]
    with pytest.raises(TypeError, match="takes standard-normal noise"):
        ndr.particle_filter(
            jax.random.PRNGKey(0),
            ar1(),
            y,
            num_particles=8,
            resampler=ndr.resampling.noise_driven(ndr.resampling.diffusion()),
        )
