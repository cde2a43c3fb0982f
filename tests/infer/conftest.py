"""The exact posterior both pseudo-marginal test modules compare against."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS

import numpyro_diffres as ndr
from benchmarks import models

NUM_STEPS = 20


def _kalman_model(y):
    """phi ~ U(-1, 1) and the Kalman likelihood of the AR(1) model of both test modules."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    eye = jnp.eye(1)
    params = ndr.LinearGaussianParams(jnp.zeros(1), eye, phi * eye, 0.25 * eye, eye, 0.25 * eye)
    numpyro.factor("y", ndr.kalman_log_likelihood(params, y[:, None]))


@pytest.fixture(scope="module")
def exact_posterior():
    """Draws of phi given 20 observations of AR(1) at phi = 0.7, q = r = 0.5, x_0 ~ N(0, 1)."""
    ssm = models.ar1(0.7, 0.5, 0.5, initial_scale=1.0)
    y = ndr.simulate(jax.random.PRNGKey(0), ssm, NUM_STEPS)[1]
    mcmc = MCMC(NUTS(_kalman_model), num_warmup=500, num_samples=4000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(2), y)
    return np.asarray(mcmc.get_samples()["phi"])
