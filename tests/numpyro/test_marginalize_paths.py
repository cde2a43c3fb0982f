"""`marginalize(..., latent_paths=True)`: the latent sites NUTS over the latents would give,
drawn by smoothing, against the exact (RTS) smoother of a linear-Gaussian program (float64).

Each `Predictive` draw runs its own forward filter and draws one path, so the draws are
independent and their mean and variance have plain Monte Carlo errors; the comparison is
joint over the time steps (Bonferroni, family-wise false-alarm rate `ALPHA`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from numpyro.infer import Predictive

import numpyro_diffres as ndr

ALPHA = 0.01
PHI, Q, R = 0.8, 0.6, 0.5
T = 16
DRAWS = 256
PARTICLES = 128


def x0_before_scan(y):
    """AR(1) plus noise, x_0 and y_0 before the scan; phi, q, r sampled as statics."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    q = numpyro.sample("q", dist.HalfNormal(1.0))
    r = numpyro.sample("r", dist.HalfNormal(1.0))
    x0 = numpyro.sample("x0", dist.Normal(0.0, q / jnp.sqrt(1.0 - phi**2)))
    numpyro.sample("y0", dist.Normal(x0, r), obs=y[0])

    def body(x, y_t):
        x = numpyro.sample("x", dist.Normal(phi * x, q))
        numpyro.sample("y", dist.Normal(x, r), obs=y_t)
        return x, None

    scan(body, x0, y[1:])


def innovations_in_body(y):
    """The same law with x_0 drawn in the body and the state built from an innovation site
    and a deterministic site: the carry depends on the previous carry given the sites."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    q = numpyro.sample("q", dist.HalfNormal(1.0))
    r = numpyro.sample("r", dist.HalfNormal(1.0))

    def body(x, inputs):
        t, y_t = inputs
        first = t == 0
        eps = numpyro.sample("eps", dist.Normal(0.0, 1.0))
        scale = jnp.where(first, q / jnp.sqrt(1.0 - phi**2), q)
        x = numpyro.deterministic("state", jnp.where(first, 0.0, phi * x) + scale * eps)
        numpyro.sample("y", dist.Normal(x, r), obs=y_t)
        return x, None

    scan(body, jnp.zeros(()), (jnp.arange(y.shape[0]), y))


def rts(y):
    """Exact smoothed means and variances of x_{0:T-1} (scalar Kalman filter + RTS)."""
    y = np.asarray(y, np.float64)
    means, variances, predicted = [], [], []
    m, p = 0.0, Q**2 / (1.0 - PHI**2)
    for t, y_t in enumerate(y):
        if t:
            m, p = PHI * m, PHI**2 * p + Q**2
        predicted.append((m, p))
        gain = p / (p + R**2)
        m, p = m + gain * (y_t - m), (1.0 - gain) * p
        means.append(m)
        variances.append(p)
    for t in range(len(y) - 2, -1, -1):
        m_pred, p_pred = predicted[t + 1]
        gain = variances[t] * PHI / p_pred
        means[t] = means[t] + gain * (means[t + 1] - m_pred)
        variances[t] = variances[t] + gain**2 * (variances[t + 1] - p_pred)
    return np.array(means), np.array(variances)


@pytest.fixture(scope="module")
def observations():
    with jax.enable_x64(True):
        model = ndr.StateSpaceModel(
            initial=dist.Normal(0.0, Q / math.sqrt(1.0 - PHI**2)),
            transition=lambda x, t: dist.Normal(PHI * x, Q),
            emission=lambda x, t: dist.Normal(x, R),
        )
        return np.asarray(ndr.simulate(jax.random.PRNGKey(3), model, T)[1])


def smoothed_paths(model, y, smoothing):
    """`DRAWS` independent smoothed draws of every latent site at the true statics."""
    with jax.enable_x64(True):
        statics = {"phi": PHI, "q": Q, "r": R}
        marginal = ndr.marginalize(
            handlers.condition(model, statics),
            num_particles=PARTICLES,
            latent_paths=True,
            smoothing=smoothing,
        )
        draws = Predictive(marginal, num_samples=DRAWS)(jax.random.PRNGKey(0), jnp.asarray(y))
        return {name: np.asarray(value, np.float64) for name, value in draws.items()}


def assert_moments_match(paths, y):
    """Joint check of the per-step mean and variance against RTS."""
    means, variances = rts(y)
    assert paths.shape == (DRAWS, T)
    z_mean = (paths.mean(0) - means) / np.sqrt(variances / DRAWS)
    # Var of the sample variance of a Gaussian: 2 sigma^4 / (n - 1).
    z_var = (paths.var(0, ddof=1) - variances) / (variances * math.sqrt(2.0 / (DRAWS - 1)))
    threshold = scipy.stats.norm.ppf(1 - ALPHA / (2 * 2 * T))
    assert np.max(np.abs(z_mean)) < threshold, (np.abs(z_mean).max(), threshold)
    assert np.max(np.abs(z_var)) < threshold, (np.abs(z_var).max(), threshold)


def test_backward_paths_of_x0_before_the_scan_match_rts(observations):
    draws = smoothed_paths(x0_before_scan, observations, "backward")
    # The sites NUTS over the latents would give: x0 scalar, x with one row per scan step.
    assert draws["x0"].shape == (DRAWS,) and draws["x"].shape == (DRAWS, T - 1)
    paths = np.concatenate([draws["x0"][:, None], draws["x"]], axis=1)
    assert_moments_match(paths, observations)


def test_paths_with_a_carry_built_from_the_previous_one_match_rts(observations):
    # The innovation `eps` does not determine the state alone: the backward pass can only
    # step to the particle's own ancestor and falls back to the genealogy, still exact.
    draws = smoothed_paths(innovations_in_body, observations, "backward")
    assert draws["eps"].shape == (DRAWS, T)
    assert_moments_match(draws["state"], observations)
