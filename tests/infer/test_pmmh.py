"""PMMH and correlated PMMH kernels: exactness against Kalman posteriors, state, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import initialize_model

import numpyro_diffres as ndr
from benchmarks import models
from numpyro_diffres.infer.pmmh import PMMHState

NUM_STEPS = 20


def ar1(phi):
    """x_t = phi x_{t-1} + N(0, 0.5^2), y_t = x_t + N(0, 0.5^2), x_0 ~ N(0, 1)."""
    return models.ar1(phi, 0.5, 0.5, initial_scale=1.0)


def observations():
    return ndr.simulate(jax.random.PRNGKey(0), ar1(0.7), NUM_STEPS)[1]


def particle_model(y, num_particles=16, noise=None, resampler=None):
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    ndr.particle_factor(
        "y",
        ar1(phi),
        y,
        num_particles=num_particles,
        resampler=ndr.resampling.systematic() if resampler is None else resampler,
        noise=noise,
    )


def run(kernel, *args, num_warmup=300, num_samples=1500, num_chains=4, seed=1, **kwargs):
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("accept_prob",), **kwargs)
    return mcmc


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kernel", "noise"),
    [(ndr.infer.PMMH, None), (ndr.infer.PMMH, "sampled"), (ndr.infer.CorrelatedPMMH, "sampled")],
)
def test_pmmh_samples_the_exact_posterior_at_small_n(exact_posterior, mcse_mean, kernel, noise):
    # N = 16 particles: a log-likelihood SD near 1, where a fixed-key filter is visibly off.
    y = observations()
    mcmc = run(kernel(lambda y: particle_model(y, noise=noise)), y, num_samples=2500)
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["phi"])
    error = abs(draws.mean() - exact_posterior.mean())
    assert error < 4.0 * mcse_mean(draws), (draws.mean(), exact_posterior.mean())
    np.testing.assert_allclose(draws.std(), exact_posterior.std(), rtol=0.15)


@pytest.mark.slow
def test_fixed_key_surrogate_is_biased_where_pmmh_is_not(exact_posterior, mcse_mean):
    # The canary: the same N with the noise frozen (one fixed filter key, diffusion
    # resampling, NUTS) conditions on one draw of the estimate.
    y = observations()

    def frozen(y):
        phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
        ndr.particle_factor("y", ar1(phi), y, num_particles=16, key=jax.random.PRNGKey(5))

    mcmc = MCMC(NUTS(frozen), num_warmup=300, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(3), y)
    draws = np.asarray(mcmc.get_samples()["phi"])
    assert abs(draws.mean() - exact_posterior.mean()) > 4.0 * mcse_mean(draws[None])


def test_the_estimate_is_kept_with_the_point():
    y = observations()
    mcmc = run(ndr.infer.PMMH(particle_model), y, num_warmup=20, num_samples=200, num_chains=1)
    phi = np.asarray(mcmc.get_samples()["phi"])
    log_likelihood = np.asarray(mcmc.get_extra_fields()["log_likelihood"])
    stayed = phi[1:] == phi[:-1]
    # Rejected proposals keep both the point and its estimate; accepted ones change both.
    assert stayed.any() and (~stayed).any()
    np.testing.assert_array_equal(log_likelihood[1:][stayed], log_likelihood[:-1][stayed])
    assert np.all(log_likelihood[1:][~stayed] != log_likelihood[:-1][~stayed])


def test_the_stored_estimate_is_the_filters_log_likelihood():
    y = observations()
    kernel = ndr.infer.PMMH(lambda y: particle_model(y, noise="sampled"))
    state = kernel.init(jax.random.PRNGKey(0), 10, None, (y,), {})
    assert isinstance(state, PMMHState)
    noise = state.z["y_noise"]
    phi = kernel.postprocess_fn((y,), {})(state.z)["phi"]
    flat = jnp.asarray(noise)
    from numpyro_diffres.noise import noise_filter, noise_shape, unflatten_noise

    expected = noise_filter(unflatten_noise(flat, noise_shape(NUM_STEPS, 16, ())), ar1(phi), y)
    np.testing.assert_allclose(state.log_likelihood, expected.log_likelihood, rtol=1e-5)


def test_correlated_moves_keep_successive_estimates_close():
    # With rho = 0.99 the log-likelihood ratio of successive proposals is far less variable
    # than with fresh noise (rho = 0): the point of the correlated kernel.
    y = observations()

    def spread(kernel):
        mcmc = run(kernel, y, num_warmup=50, num_samples=300, num_chains=1)
        values = np.asarray(mcmc.get_extra_fields()["log_likelihood"])
        return np.std(np.diff(values))

    model = lambda y: particle_model(y, num_particles=8, noise="sampled")  # noqa: E731
    fresh = spread(ndr.infer.PMMH(model, adapt=False, step_size=1e-3))
    correlated = spread(ndr.infer.CorrelatedPMMH(model, adapt=False, step_size=1e-3))
    assert correlated < 0.5 * fresh, (correlated, fresh)


def test_warmup_adapts_the_random_walk_towards_the_target_rate():
    y = observations()
    mcmc = run(
        ndr.infer.PMMH(lambda y: particle_model(y, num_particles=64), step_size=50.0),
        y,
        num_warmup=400,
        num_samples=400,
        num_chains=2,
    )
    rate = float(np.mean(mcmc.get_extra_fields()["accept_prob"]))
    assert 0.05 < rate < 0.4, rate
    unadapted = run(
        ndr.infer.PMMH(lambda y: particle_model(y, num_particles=64), step_size=50.0, adapt=False),
        y,
        num_warmup=400,
        num_samples=400,
        num_chains=2,
    )
    assert float(np.mean(unadapted.get_extra_fields()["accept_prob"])) < 0.05


@pytest.mark.parametrize(
    "resampler",
    [
        ndr.resampling.diffusion(),
        ndr.resampling.soft(0.5),
        ndr.resampling.gumbel_softmax(0.5),
        ndr.resampling.adaptive(ndr.resampling.soft(0.5), 0.5),
    ],
)
def test_a_biased_resampler_is_refused(resampler):
    y = observations()
    kernel = ndr.infer.PMMH(lambda y: particle_model(y, resampler=resampler))
    with pytest.raises(ValueError, match="not unbiased"):
        kernel.init(jax.random.PRNGKey(0), 10, None, (y,), {})


@pytest.mark.parametrize(
    "resampler",
    [
        ndr.resampling.stratified(),
        ndr.resampling.stop_gradient(ndr.resampling.multinomial()),
        ndr.resampling.adaptive(ndr.resampling.systematic(), 0.5),
    ],
)
def test_index_resamplers_are_accepted(resampler):
    y = observations()
    kernel = ndr.infer.PMMH(lambda y: particle_model(y, resampler=resampler))
    state = kernel.init(jax.random.PRNGKey(0), 10, None, (y,), {})
    assert jnp.isfinite(state.log_likelihood)


def test_correlated_kernel_needs_noise_sites():
    y = observations()
    with pytest.raises(ValueError, match="noise='sampled'"):
        ndr.infer.CorrelatedPMMH(particle_model).init(jax.random.PRNGKey(0), 10, None, (y,), {})


def test_discrete_latent_sites_are_refused():
    def model():
        numpyro.sample("k", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="discrete"):
        ndr.infer.PMMH(model).init(jax.random.PRNGKey(0), 10, None, (), {})


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"step_size": 0.0}, "step_size"),
        ({"target_accept_prob": 1.0}, "target_accept_prob"),
        ({"correlation": 1.0}, "correlation"),
        ({"correlation": -0.1}, "correlation"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        ndr.infer.PMMH(particle_model, **settings)


def test_a_model_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="callable"):
        ndr.infer.PMMH("model")


def test_plain_observed_sites_sample_a_conjugate_posterior(mcse_mean):
    # No particle filter: PMMH is then an exact adaptive random walk.
    y = jax.random.normal(jax.random.PRNGKey(0), (20,)) + 1.5

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    mcmc = run(ndr.infer.PMMH(model), y, num_warmup=300, num_samples=1500)
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["mu"])
    precision = 20.0 + 1.0 / 100.0
    assert abs(draws.mean() - float(y.sum()) / precision) < 4.0 * mcse_mean(draws)
    np.testing.assert_allclose(draws.std(), precision**-0.5, rtol=0.1)


def test_initialize_model_trace_marks_the_noise_site():
    y = observations()
    info = initialize_model(
        jax.random.PRNGKey(0), lambda y: particle_model(y, noise="sampled"), model_args=(y,)
    )
    site = info.model_trace["y_noise"]
    assert site["infer"]["particle_noise"]
    assert site["value"].shape == (16 * NUM_STEPS + NUM_STEPS - 1,)


def noise_model(y, num_particles=16):
    particle_model(y, num_particles=num_particles, noise="sampled")


def test_particle_count_rule_reaches_its_target_and_correlation_lowers_it():
    y = observations()
    plain = ndr.diagnostics.choose_pmmh_num_particles(
        jax.random.PRNGKey(0), noise_model, {"phi": 0.7}, model_args=(y,), initial=2
    )
    assert plain.reached and plain.sd <= 1.2
    # The SD halves (about) when N quadruples: the rule's tried counts show it falling.
    assert plain.tried[0][1] > plain.sd
    correlated = ndr.diagnostics.choose_pmmh_num_particles(
        jax.random.PRNGKey(0),
        noise_model,
        {"phi": 0.7},
        model_args=(y,),
        correlation=0.99,
        initial=2,
    )
    assert correlated.reached
    assert correlated.num_particles < plain.num_particles


def test_particle_count_rule_refuses_missing_statics_and_a_correlated_rule_without_noise():
    y = observations()
    with pytest.raises(ValueError, match="no value for the static sites"):
        ndr.diagnostics.choose_pmmh_num_particles(
            jax.random.PRNGKey(0), noise_model, {}, model_args=(y,)
        )
    with pytest.raises(ValueError, match="noise='sampled'"):
        ndr.diagnostics.choose_pmmh_num_particles(
            jax.random.PRNGKey(0),
            particle_model,
            {"phi": 0.7},
            model_args=(y,),
            correlation=0.9,
        )


def test_sampling_after_warmup_keeps_the_warm_state_without_initialising_again():
    y = observations()
    kernel = ndr.infer.PMMH(particle_model)
    calls = []
    initialise = kernel.init

    def counted(*args, **kwargs):
        calls.append(1)
        return initialise(*args, **kwargs)

    kernel.init = counted
    mcmc = MCMC(kernel, num_warmup=30, num_samples=20, progress_bar=False)
    mcmc.warmup(jax.random.PRNGKey(0), y)
    warm = mcmc.post_warmup_state
    mcmc.run(warm.rng_key, y)
    assert len(calls) == 1
    assert int(mcmc.last_state.i) == 50
    np.testing.assert_array_equal(warm.scale_tril, mcmc.last_state.scale_tril)


def test_noise_sites_stay_in_the_state_but_out_of_the_draws():
    y = observations()
    mcmc = run(ndr.infer.CorrelatedPMMH(noise_model), y, num_warmup=20, num_samples=10)
    assert set(mcmc.get_samples()) == {"phi"}
    assert mcmc.last_state.z["y_noise"].shape == (4, 16 * NUM_STEPS + NUM_STEPS - 1)


def test_deterministic_sites_are_replayed_into_the_draws():
    y = observations()

    def model(y):
        particle_model(y)
        phi = numpyro.sample("phi_again", dist.Normal(0.0, 1.0))
        numpyro.deterministic("twice", 2.0 * phi)

    mcmc = run(ndr.infer.PMMH(model), y, num_warmup=20, num_samples=10, num_chains=2)
    draws = mcmc.get_samples()
    np.testing.assert_allclose(draws["twice"], 2.0 * draws["phi_again"], rtol=1e-6)
    assert np.all(np.abs(draws["phi"]) < 1.0)


def test_init_strategy_and_init_params_are_honoured():
    y = observations()
    kernel = ndr.infer.PMMH(particle_model, init_strategy=numpyro.infer.init_to_median)
    state = kernel.init(jax.random.PRNGKey(0), 10, None, (y,), {})
    # init_to_median puts phi at the median of Uniform(-1, 1): unconstrained 0.
    np.testing.assert_allclose(state.z["phi"], 0.0, atol=0.1)
    state = kernel.init(jax.random.PRNGKey(0), 10, {"phi": jnp.array(0.8)}, (y,), {})
    np.testing.assert_allclose(state.z["phi"], 0.8)
    assert np.isfinite(state.log_likelihood)


def test_a_model_without_a_finite_start_is_refused_clearly():
    y = observations()

    def impossible(y):
        phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
        numpyro.factor("never", -jnp.inf * (phi * phi + 1.0))

    with pytest.raises(RuntimeError, match="no initial point"):
        run(ndr.infer.PMMH(impossible), y, num_warmup=5, num_samples=5)


def test_init_params_may_leave_out_the_noise_sites():
    y = observations()
    kernel = ndr.infer.CorrelatedPMMH(noise_model)
    state = kernel.init(jax.random.PRNGKey(0), 10, {"phi": jnp.array(0.5)}, (y,), {})
    np.testing.assert_allclose(state.z["phi"], 0.5)
    assert state.z["y_noise"].shape == (16 * NUM_STEPS + NUM_STEPS - 1,)
    assert 0.5 < float(jnp.std(state.z["y_noise"])) < 1.5
