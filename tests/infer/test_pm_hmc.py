"""Pseudo-marginal HMC: NUTS on the statics and the noise of a diffusion particle factor.

`particle_factor(..., noise="sampled", resampler=diffusion(...))` makes the filter's noise $u$ a
latent site and its estimate smooth in $(\\theta, u)$, so NUTS samples
$p(\\theta)\\,N(u; 0, I)\\,\\hat p(y \\mid \\theta, u)$. The estimate is not unbiased: PMMH
refuses it, and the theta-marginal is near the exact posterior only for large N.
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import initialize_model

import numpyro_diffres as ndr
from benchmarks import models

NUM_STEPS = 20


def ar1(phi):
    """x_t = phi x_{t-1} + N(0, 0.5^2), y_t = x_t + N(0, 0.5^2), x_0 ~ N(0, 1)."""
    return models.ar1(phi, 0.5, 0.5, initial_scale=1.0)


def observations(num_steps=NUM_STEPS):
    return ndr.simulate(jax.random.PRNGKey(0), ar1(0.7), num_steps)[1]


def model(y, num_particles=8, resampler=None):
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    resampler = ndr.resampling.diffusion(num_steps=2) if resampler is None else resampler
    ndr.particle_factor(
        "y", ar1(phi), y, num_particles=num_particles, resampler=resampler, noise="sampled"
    )


def trace(resampler, y):
    return initialize_model(
        jax.random.PRNGKey(0), lambda y: model(y, resampler=resampler), model_args=(y,)
    ).model_trace


def test_the_factor_says_whether_its_estimate_is_unbiased():
    y = observations(6)
    diffusion = trace(ndr.resampling.diffusion(num_steps=2), y)
    sorted_systematic = trace(ndr.resampling.systematic(), y)
    assert not diffusion["y"]["infer"]["particle_filter"]["unbiased"]
    assert sorted_systematic["y"]["infer"]["particle_filter"]["unbiased"]
    # The noise site holds the moves (N T) and the diffusion starts (N per later step).
    assert diffusion["y_noise"]["value"].shape == (8 * 6 + 8 * 5,)
    assert sorted_systematic["y_noise"]["value"].shape == (8 * 6 + 5,)


@pytest.mark.parametrize("kernel", [ndr.infer.PMMH, ndr.infer.CorrelatedPMMH])
def test_pmmh_refuses_a_diffusion_noise_factor(kernel):
    y = observations(6)
    with pytest.raises(ValueError, match="not unbiased.*pseudo-marginal HMC"):
        kernel(model).init(jax.random.PRNGKey(0), 10, None, (y,), {})


def test_a_resampler_without_a_noise_driven_form_is_refused():
    y = observations(6)
    with pytest.raises(ValueError, match="has no such form"):
        trace(ndr.resampling.optimal_transport(), y)


def test_nuts_moves_the_noise_with_the_parameter():
    y = observations(10)
    mcmc = MCMC(NUTS(model), num_warmup=30, num_samples=30, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), y, extra_fields=("potential_energy",))
    samples = mcmc.get_samples()
    assert samples["phi"].shape == (30,)
    assert samples["y_noise"].shape == (30, 8 * 10 + 8 * 9)
    assert np.all(np.isfinite(samples["y_noise"]))
    assert np.all(np.isfinite(mcmc.get_extra_fields()["potential_energy"]))
    assert np.all(np.abs(samples["phi"]) < 1.0) and np.std(samples["phi"]) > 0.0
    # Every noise coordinate is sampled: it changes across the draws.
    assert np.all(np.std(samples["y_noise"], axis=0) > 0.0)


@pytest.mark.slow
def test_pm_hmc_theta_marginal_is_near_the_exact_posterior(exact_posterior, mcse_mean):
    # N = 64: diffusion resampling's bias is then well below the posterior SD (measured by
    # benchmarks/pm_hmc_bias.py); the check allows 0.15 posterior SD of bias on top of 4 MCSE.
    y = observations()
    mcmc = MCMC(
        NUTS(lambda y: model(y, num_particles=64, resampler=ndr.resampling.diffusion(num_steps=4))),
        num_warmup=400,
        num_samples=1000,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(3), y)
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["phi"])
    error = abs(draws.mean() - exact_posterior.mean())
    allowed = 4.0 * mcse_mean(draws) + 0.15 * exact_posterior.std()
    print(f"PM-HMC mean {draws.mean():.4f} SD {draws.std():.4f}; exact mean ", end="")
    print(f"{exact_posterior.mean():.4f} SD {exact_posterior.std():.4f}; allowed {allowed:.4f}")
    assert error < allowed, (draws.mean(), exact_posterior.mean(), allowed)
    np.testing.assert_allclose(draws.std(), exact_posterior.std(), rtol=0.2)
