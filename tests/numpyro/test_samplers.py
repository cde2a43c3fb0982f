"""blackjax NUTS on NumPyro potentials: exact posteriors, NumPyro NUTS, ArviZ, bad input."""

import math
import os
import subprocess
import sys

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import initialize_model, potential_energy

import numpyro_diffres as ndr
from numpyro_diffres import resampling
from numpyro_diffres.samplers import BlackjaxInfo, BlackjaxResult

PRIOR_SCALE = 10.0


def conjugate_model(y):
    """Normal mean with known unit variance (exact posterior), plus a prior-only positive site."""
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SCALE))
    numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    numpyro.deterministic("twice", 2.0 * mu)
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.slow
def test_blackjax_nuts_matches_a_conjugate_posterior(mcse_mean):
    y = jax.random.normal(jax.random.PRNGKey(0), (20,)) + 1.5
    precision = y.size + 1.0 / PRIOR_SCALE**2
    exact_mean, exact_sd = float(y.sum() / precision), 1.0 / math.sqrt(precision)
    chains, draws = 2, 500
    result = ndr.blackjax_nuts(
        jax.random.PRNGKey(1), conjugate_model, y, num_warmup=200, num_samples=draws, num_chains=2
    )
    mu = np.asarray(result.samples["mu"])
    assert mu.shape == (chains, draws)
    assert result.samples["twice"].shape == (chains, draws)
    np.testing.assert_allclose(result.samples["twice"], 2 * mu, rtol=1e-6)
    # Means within 5 ESS-based standard errors; the SD within 5 standard errors of an SD.
    assert abs(mu.mean() - exact_mean) < 5 * mcse_mean(mu)
    ess = float(az.ess(mu))
    assert abs(mu.std() / exact_sd - 1.0) < 5 / math.sqrt(2 * ess)
    # Constrained values: the LogNormal site is positive and its log has the prior's mean 0.
    scale = np.asarray(result.samples["scale"])
    assert np.all(scale > 0)
    assert abs(np.log(scale).mean()) < 5 * mcse_mean(np.log(scale))
    info = result.info
    assert info.diverging.shape == info.acceptance_rate.shape == (chains, draws)
    assert info.num_integration_steps.shape == (chains, draws)
    assert info.step_size.shape == (chains,)
    assert int(info.diverging.sum()) == 0
    assert np.all(np.asarray(info.step_size) > 0)
    # Dual averaging targets 0.8 acceptance; the realised mean lands near it.
    assert 0.6 < float(info.acceptance_rate.mean()) < 0.98


def particle_model(y, num_particles=16, key=None):
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    log_q = numpyro.sample("log_q", dist.Normal(math.log(0.6), 0.5))
    log_r = numpyro.sample("log_r", dist.Normal(math.log(0.8), 0.5))
    model = ndr.StateSpaceModel(
        initial=dist.Normal(jnp.zeros(1), 1.0).to_event(1),
        transition=lambda x, t: dist.Normal(phi * x, jnp.exp(log_q)).to_event(1),
        emission=lambda x, t: dist.Normal(x, jnp.exp(log_r)).to_event(1),
    )
    ndr.particle_factor(
        "y",
        model,
        y,
        num_particles=num_particles,
        resampler=resampling.diffusion(num_steps=4),
        key=key,
    )


def simulated(num_steps=30):
    model = ndr.StateSpaceModel(
        initial=dist.Normal(jnp.zeros(1), 1.0).to_event(1),
        transition=lambda x, t: dist.Normal(0.8 * x, 0.6).to_event(1),
        emission=lambda x, t: dist.Normal(x, 0.8).to_event(1),
    )
    return ndr.simulate(jax.random.PRNGKey(0), model, num_steps)[1]


@pytest.mark.slow
def test_potential_is_deterministic_and_uses_a_fixed_key():
    y = simulated()
    model_info = initialize_model(jax.random.PRNGKey(3), particle_model, model_args=(y,))
    potential = jax.jit(model_info.potential_fn)
    params = {"phi": jnp.asarray(0.3), "log_q": jnp.asarray(-0.4), "log_r": jnp.asarray(-0.1)}
    first, second = potential(params), potential(params)
    assert np.isfinite(first) and float(first) == float(second)
    # The noise is NumPyro's fixed default key (as under MCMC(NUTS)), whatever the init key:
    # the same value as with the explicit key PRNGKey(0), and not that of another key.
    with_key = jax.jit(
        lambda key, params: potential_energy(particle_model, (y,), {"key": key}, params)
    )
    np.testing.assert_allclose(with_key(jax.random.PRNGKey(0), params), first, rtol=1e-6)
    assert float(with_key(jax.random.PRNGKey(1), params)) != float(first)


@pytest.fixture(scope="module")
def both_routes():
    y = simulated()
    # Sizing: N = 16 is enough here, both routes sample the same fixed-noise surrogate posterior
    # (NumPyro's default key), so they must agree whatever its distance to the exact one.
    blackjax_result = ndr.blackjax_nuts(
        jax.random.PRNGKey(5), particle_model, y, num_warmup=150, num_samples=300, num_chains=2
    )
    mcmc = MCMC(
        NUTS(particle_model),
        num_warmup=150,
        num_samples=300,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(6), y)
    return blackjax_result, mcmc.get_samples(group_by_chain=True)


@pytest.mark.slow
def test_blackjax_route_agrees_with_numpyro_nuts(both_routes, mcse_mean):
    blackjax_result, numpyro_samples = both_routes
    assert int(blackjax_result.info.diverging.sum()) == 0
    for name in ("phi", "log_q", "log_r"):
        ours = np.asarray(blackjax_result.samples[name])
        theirs = np.asarray(numpyro_samples[name])
        assert ours.shape == (2, 300)
        assert az.rhat(ours) < 1.05, name
        tolerance = 4 * math.hypot(mcse_mean(ours), mcse_mean(theirs))
        assert abs(ours.mean() - theirs.mean()) < tolerance, (name, ours.mean(), theirs.mean())


@pytest.mark.slow
def test_to_inference_data_of_a_run(both_routes):
    blackjax_result, _ = both_routes
    idata = ndr.to_inference_data(blackjax_result)
    for name in ("phi", "log_q", "log_r"):
        assert idata.posterior[name].dims == ("chain", "draw")
        assert idata.posterior[name].shape == (2, 300)
    assert idata.sample_stats["diverging"].shape == (2, 300)
    summary = az.summary(idata, var_names=["phi"])
    assert np.isfinite(summary.loc["phi", "mean"])


def test_to_inference_data_dims_and_stats():
    chains, draws = 3, 7
    samples = {
        "mu": jnp.arange(chains * draws, dtype=jnp.float32).reshape(chains, draws),
        "path": jnp.zeros((chains, draws, 5, 2)),
    }
    info = BlackjaxInfo(
        diverging=jnp.zeros((chains, draws), bool),
        acceptance_rate=jnp.full((chains, draws), 0.8),
        num_integration_steps=jnp.full((chains, draws), 3),
        step_size=jnp.ones(chains),
        inverse_mass_matrix={"mu": jnp.ones(chains)},
    )
    idata = ndr.to_inference_data(BlackjaxResult(samples, info))
    assert idata.posterior["mu"].dims == ("chain", "draw")
    assert idata.posterior["path"].dims[:2] == ("chain", "draw")
    assert idata.posterior["path"].shape == (chains, draws, 5, 2)
    np.testing.assert_array_equal(idata.posterior["mu"].values, samples["mu"])
    assert set(idata.sample_stats.data_vars) == {"diverging", "acceptance_rate", "n_steps"}


def test_to_inference_data_rejects_other_objects():
    with pytest.raises(TypeError, match="BlackjaxResult"):
        ndr.to_inference_data({"mu": np.zeros((1, 3))})


@pytest.mark.parametrize("argument", ["num_warmup", "num_samples", "num_chains"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_counts_are_value_errors(argument, value):
    with pytest.raises(ValueError, match=argument):
        ndr.blackjax_nuts(jax.random.PRNGKey(0), conjugate_model, jnp.zeros(3), **{argument: value})


@pytest.mark.parametrize("argument", ["num_warmup", "num_samples", "num_chains"])
@pytest.mark.parametrize("value", [2.0, True, "10"])
def test_non_integer_counts_are_type_errors(argument, value):
    with pytest.raises(TypeError, match=argument):
        ndr.blackjax_nuts(jax.random.PRNGKey(0), conjugate_model, jnp.zeros(3), **{argument: value})


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5])
def test_target_accept_outside_the_unit_interval(value):
    with pytest.raises(ValueError, match="target_accept"):
        ndr.blackjax_nuts(jax.random.PRNGKey(0), conjugate_model, jnp.zeros(3), target_accept=value)


def test_non_callable_model_is_a_type_error():
    with pytest.raises(TypeError, match="model"):
        ndr.blackjax_nuts(jax.random.PRNGKey(0), "conjugate_model", jnp.zeros(3))


@pytest.mark.parametrize("key", [0, jnp.zeros((3, 2), jnp.uint32)], ids=["int", "batch"])
def test_bad_key_is_a_type_error(key):
    with pytest.raises(TypeError, match="key"):
        ndr.blackjax_nuts(key, conjugate_model, jnp.zeros(3))


def test_importing_the_package_leaves_set_host_device_count_effective():
    # NumPyro users call numpyro.set_host_device_count(n) after their imports, to run chains in
    # parallel on CPU; it only works while JAX's backend is not started. blackjax starts it at
    # import, so the package must import blackjax lazily.
    code = (
        "import numpyro_diffres, numpyro\n"
        "numpyro.set_host_device_count(3)\n"
        "import jax\n"
        "print(jax.local_device_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split()[-1] == "3"
