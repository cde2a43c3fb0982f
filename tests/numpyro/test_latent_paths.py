"""sample_latent_paths inside NumPyro models: Predictive, the NUTS potential, ArviZ.

The model is an AR(1)-plus-noise SSM with a particle-filter likelihood; the smoothed paths and
forecasts are switched on by a `predict` argument, the recommended pattern.
"""

import math

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.infer.util import potential_energy

import numpyro_diffres as ndr
from benchmarks.models import ar1, ar1_params
from numpyro_diffres import resampling
from numpyro_diffres.primitives import sample_latent_paths

T = 30
HORIZON = 5
TRUE = {"phi": 0.8, "q": 0.6, "r": 0.5}


def priors():
    phi = numpyro.sample("phi", dist.Uniform(-0.98, 0.98))
    q = numpyro.sample("q", dist.LogNormal(math.log(0.6), 0.3))
    r = numpyro.sample("r", dist.LogNormal(math.log(0.5), 0.3))
    return phi, q, r


def model(y, predict=False, num_paths=1, leak=False):
    """`leak`: a canary whose potential does depend on the smoothed path."""
    ssm = ar1(*priors())
    ndr.particle_factor("y", ssm, y, num_particles=16, resampler=resampling.diffusion(num_steps=4))
    if predict:
        states, _, _ = sample_latent_paths(
            "x", ssm, y, num_particles=128, num_paths=num_paths, num_steps_ahead=HORIZON
        )
        if leak:
            numpyro.factor("leak", 0.0 * states.sum())


def exact_model(y, predict=False):
    """Kalman likelihood: cheap NUTS for the ArviZ plumbing."""
    phi, q, r = priors()
    numpyro.factor("y", ndr.kalman_log_likelihood(ar1_params(phi, q, r), y[:, None]))
    if predict:
        sample_latent_paths("x", ar1(phi, q, r), y, num_particles=64, num_steps_ahead=HORIZON)


def kalman_scalar(y, phi, q, r):
    """Exact filtering and smoothing means of the scalar AR(1)-plus-noise model (float64)."""
    y = np.asarray(y, np.float64)
    mean, var = 0.0, q**2 / (1 - phi**2)
    means, variances = [], []
    for t, value in enumerate(y):
        if t > 0:
            mean, var = phi * mean, phi**2 * var + q**2
        gain = var / (var + r**2)
        mean, var = mean + gain * (value - mean), (1 - gain) * var
        means.append(mean)
        variances.append(var)
    smoothed = [means[-1]]
    smoothed_var = variances[-1]
    for t in range(len(y) - 2, -1, -1):
        predicted = phi**2 * variances[t] + q**2
        gain = variances[t] * phi / predicted
        smoothed.insert(0, means[t] + gain * (smoothed[0] - phi * means[t]))
        smoothed_var = variances[t] + gain**2 * (smoothed_var - predicted)
    return np.array(means), np.array(smoothed)


@pytest.fixture(scope="module")
def observations():
    _, y = ndr.simulate(jax.random.PRNGKey(0), ar1(**TRUE), T)
    return y


@pytest.fixture(scope="module")
def fixed_predictive(observations):
    """Predictive at 400 copies of the true parameters: each draw a fresh smoother key."""
    draws = 400
    posterior = {name: jnp.full((draws,), value) for name, value in TRUE.items()}
    predictive = Predictive(model, posterior, return_sites=["x_states", "x_forecast"])
    return jax.jit(lambda key: predictive(key, observations, predict=True))(jax.random.PRNGKey(1))


def within_mc_error(draws, exact, alpha=0.01):
    """Independent draws `(D, ...)`: the mean matches `exact` jointly (Bonferroni t)."""
    draws = np.asarray(draws, np.float64)
    se = draws.std(0, ddof=1) / math.sqrt(draws.shape[0])
    z = (draws.mean(0) - np.asarray(exact)) / se
    threshold = scipy.stats.t.ppf(1 - alpha / (2 * z.size), draws.shape[0] - 1)
    return np.max(np.abs(z)) < threshold


def test_predictive_gives_the_smoothing_and_forecast_distributions(observations, fixed_predictive):
    states, future = fixed_predictive["x_states"], fixed_predictive["x_forecast"]
    # num_paths == 1: one (T,) path per draw.
    assert states.shape == (400, T) and future.shape == (400, HORIZON)
    # A fresh key per draw: same parameters, different paths.
    assert not np.allclose(states[0], states[1])
    filtered, smoothed = kalman_scalar(observations, **TRUE)
    assert within_mc_error(states, smoothed)
    # Canary: the paths do not follow the filtering means.
    assert not within_mc_error(states, filtered)
    forecast_means = filtered[-1] * TRUE["phi"] ** np.arange(1, HORIZON + 1)
    assert within_mc_error(future, forecast_means)


def test_several_paths_per_draw_and_explicit_key(observations):
    traced = handlers.trace(handlers.seed(handlers.substitute(model, data=TRUE), 0))
    trace = jax.eval_shape(
        lambda y: {
            name: site["value"]
            for name, site in traced.get_trace(y, predict=True, num_paths=3).items()
            if name.startswith("x_")
        },
        observations,
    )
    assert trace["x_states"].shape == (3, T)
    assert trace["x_forecast"].shape == (3, HORIZON)
    assert trace["x_forecast_observations"].shape == (3, HORIZON)

    def paths(seed, key):
        ssm = ar1(**TRUE)
        with handlers.seed(rng_seed=seed):
            return sample_latent_paths("x", ssm, observations, num_particles=8, key=key)[0]

    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(paths(1, key), paths(2, key))
    assert not np.array_equal(paths(1, None), paths(2, None))
    # No seed handler (as in numpyro.infer.log_likelihood): a fixed key, no error.
    unseeded = sample_latent_paths("x", ar1(**TRUE), observations, num_particles=8)[0]
    assert np.all(np.isfinite(unseeded))


def compiled_potential(observations, **model_kwargs):
    """Value, gradient and XLA's flop count of the compiled NUTS potential and its gradient.

    `potential_energy` is what NUTS evaluates (the key inside it is NumPyro's fixed one).
    """
    position = {"phi": jnp.asarray(0.4), "q": jnp.asarray(-0.5), "r": jnp.asarray(-0.7)}
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda z: potential_energy(model, (observations,), model_kwargs, z))
    )
    analysis = value_and_grad.lower(position).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    value, gradient = value_and_grad(position)
    return value, gradient, analysis["flops"]


def test_the_sites_do_not_change_the_nuts_potential(observations):
    # With the sites present the potential's value, gradient and compiled cost are those of
    # the model without them: XLA removes the smoother, whose values the potential never uses.
    # (The jaxpr still holds it; the compiled program does not.)
    value, gradient, flops = compiled_potential(observations)
    with_sites = compiled_potential(observations, predict=True)
    assert with_sites[0] == value and with_sites[2] == flops
    for name in gradient:
        np.testing.assert_array_equal(with_sites[1][name], gradient[name])
    # Canary: a potential that does use the path costs more.
    assert compiled_potential(observations, predict=True, leak=True)[2] > 1.5 * flops


@pytest.fixture(scope="module")
def exact_mcmc(observations):
    mcmc = MCMC(
        NUTS(exact_model),
        num_warmup=50,
        num_samples=40,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(4), observations)
    return mcmc


def test_mcmc_without_predict_records_no_paths(exact_mcmc):
    assert set(exact_mcmc.get_samples()) == {"phi", "q", "r"}


def test_arviz_carries_paths_with_a_time_dimension(observations, exact_mcmc):
    posterior = exact_mcmc.get_samples(group_by_chain=True)
    predictive = Predictive(exact_model, posterior, batch_ndims=2)(
        jax.random.PRNGKey(5), observations, predict=True
    )
    idata = az.from_numpyro(
        exact_mcmc,
        posterior_predictive=predictive,
        coords={"time": np.arange(T), "horizon": np.arange(T, T + HORIZON)},
        dims={
            "x_states": ["time"],
            "x_forecast": ["horizon"],
            "x_forecast_observations": ["horizon"],
        },
    )
    states = idata.posterior_predictive["x_states"]
    assert states.dims == ("chain", "draw", "time")
    assert states.shape == (2, 40, T)
    np.testing.assert_array_equal(states["time"], np.arange(T))
    future = idata.posterior_predictive["x_forecast_observations"]
    assert future.dims == ("chain", "draw", "horizon")
    np.testing.assert_array_equal(future["horizon"], np.arange(T, T + HORIZON))
    assert np.all(np.isfinite(states.values)) and np.all(np.isfinite(future.values))
    # The paths vary with the posterior draw and the key: a band, not a line.
    assert np.all(states.std(("chain", "draw")).values > 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_steps_ahead": -1}, ValueError, "num_steps_ahead"),
        ({"num_steps_ahead": 1.0}, TypeError, "num_steps_ahead"),
        ({"num_paths": 0}, ValueError, "num_paths"),
        ({"key": 3}, TypeError, "key"),
        ({"method": "smooth"}, ValueError, "method"),
    ],
)
def test_bad_arguments(observations, kwargs, error, match):
    with pytest.raises(error, match=match), handlers.seed(rng_seed=0):
        sample_latent_paths("x", ar1(**TRUE), observations, num_particles=8, **kwargs)


def test_non_string_name_is_a_type_error(observations):
    with pytest.raises(TypeError, match="name"):
        sample_latent_paths(3, ar1(**TRUE), observations, num_particles=8)
