"""The suite's models, defined once: the benchmarks, the tests and new scripts import them.

- AR(1) plus noise: x_0 ~ N(0, s^2), x_t = phi x_{t-1} + N(0, q^2), y_t = x_t + N(0, r^2), with
  s the stationary scale q / sqrt(1 - phi^2) unless given (`ar1`, and its matrices `ar1_params`
  for the Kalman filter).
- The paper's linear-Gaussian model (SPEC section 6): x_0 ~ N(0, 1),
  x_t = theta_1 x_{t-1} + N(0, 1), y_t = theta_2 x_t + N(0, 0.5) (`lgssm_params`, `lgssm`).
- Stochastic volatility: x_0 ~ N(mu, sigma^2 / (1 - phi^2)), x_t = mu + phi (x_{t-1} - mu) +
  N(0, sigma^2), y_t ~ N(0, exp(x_t)) (`stochastic_volatility`; the NumPyro programs
  `sv_latent_model` and `sv_factor_model` share the priors `sv_priors`).
- Nonlinear growth: x_0 ~ N(0, 5), x_t = x/2 + 25 x / (1 + x^2) + 8 cos(1.2 t) + N(0, sv^2),
  y_t = x_t^2 / 20 + N(0, 1), T = 50 (`growth`; `growth_latent_model`, `growth_factor_model`).
- Hierarchical growth: 10 growth series, log sv_s = m + s z_s (`hierarchy_statics`,
  `hierarchy_filter_model`, `hierarchy_latent_model`), with each series' likelihood tabulated
  on a grid of log sv and the posterior by quadrature (`series_likelihood_table`,
  `hierarchy_quadrature`), `which_method`'s reference.
- Hierarchical: S AR(1)-plus-noise series with a common `phi` and emission scale `exp(log_r)`,
  series-level process-noise scales `q_s = exp(mu + tau z_s)` (non-centred partial pooling);
  `series_particle_model` puts one batched filter under `numpyro.plate`, `series_exact_model`
  the per-series Kalman log-likelihoods.

NumPyro programs over all latents (`*_latent_model`) are model functions of the data, as
`marginalize` and NUTS take them. Particle-factor programs are built from the data and the
filter's settings (`*_factor_model(data, ...)`) and take no arguments: one call per dataset and
method gives a model function for `MCMC(NUTS(model)).run(key)` or SVI.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan

import numpyro_diffres as ndr
from numpyro_diffres import resampling

# --- AR(1) plus noise ----------------------------------------------------------------------------


def ar1(phi, q, r, initial_scale=None):
    """The AR(1)-plus-noise `StateSpaceModel`; `initial_scale` defaults to the stationary one."""
    if initial_scale is None:
        initial_scale = q / jnp.sqrt(1.0 - phi**2)
    return ndr.StateSpaceModel(
        initial=dist.Normal(0.0, initial_scale),
        transition=lambda x, t: dist.Normal(phi * x, q),
        emission=lambda x, t: dist.Normal(x, r),
    )


def ar1_params(phi, q, r, initial_scale=None, dtype=None) -> ndr.LinearGaussianParams:
    """`ar1`'s matrices for `kalman_log_likelihood` (state and observation `(1,)`)."""
    one = jnp.eye(1, dtype=dtype)
    initial = q**2 / (1.0 - phi**2) if initial_scale is None else initial_scale**2
    return ndr.LinearGaussianParams(
        jnp.zeros(1, dtype), initial * one, phi * one, q**2 * one, one, r**2 * one
    )


# --- the paper's linear-Gaussian model -----------------------------------------------------------

LGSSM_EMISSION_VARIANCE = 0.5


def lgssm_params(theta) -> ndr.LinearGaussianParams:
    """The paper's matrices at `theta = (theta_1, theta_2)`, state and observation `(1,)`."""
    theta = jnp.asarray(theta)
    eye = jnp.eye(1, dtype=theta.dtype)
    return ndr.LinearGaussianParams(
        jnp.zeros(1, theta.dtype),
        eye,
        theta[0] * eye,
        eye,
        theta[1] * eye,
        LGSSM_EMISSION_VARIANCE * eye,
    )


def lgssm(theta) -> ndr.StateSpaceModel:
    """`ndr.linear_gaussian(lgssm_params(theta))` with univariate `Normal`s (no 1x1 Cholesky)."""
    emission_scale = math.sqrt(LGSSM_EMISSION_VARIANCE)
    return ndr.StateSpaceModel(
        initial=dist.Normal(jnp.zeros(1, jnp.asarray(theta).dtype), 1.0).to_event(1),
        transition=lambda x, t: dist.Normal(theta[0] * x, 1.0).to_event(1),
        emission=lambda x, t: dist.Normal(theta[1] * x, emission_scale).to_event(1),
    )


# --- stochastic volatility -----------------------------------------------------------------------


def stochastic_volatility(mu, phi, sigma):
    """The stochastic-volatility `StateSpaceModel` (stationary start)."""
    return ndr.StateSpaceModel(
        initial=dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)),
        transition=lambda x, t: dist.Normal(mu + phi * (x - mu), sigma),
        emission=lambda x, t: dist.Normal(0.0, jnp.exp(x / 2.0)),
    )


def sv_priors():
    """Mu ~ N(0, 2^2), (phi + 1) / 2 ~ Beta(10, 1.5), sigma ~ HalfNormal(1)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = numpyro.sample(
        "phi",
        dist.TransformedDistribution(
            dist.Beta(10.0, 1.5),
            dist.transforms.AffineTransform(-1.0, 2.0, domain=dist.constraints.unit_interval),
        ),
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    return mu, phi, sigma


def sv_latent_model(*, record_path=False):
    """`model(returns)`: stochastic volatility as an ordinary NumPyro program.

    The statics and a non-centred latent log-volatility path (`z0`, then `z` in a `scan`);
    `record_path` also records the path as the deterministic site `x`.
    """

    def model(returns):
        mu, phi, sigma = sv_priors()
        z0 = numpyro.sample("z0", dist.Normal(0.0, 1.0))
        x0 = mu + sigma / jnp.sqrt(1.0 - phi**2) * z0
        numpyro.sample("r0", dist.Normal(0.0, jnp.exp(x0 / 2.0)), obs=returns[0])

        def step(x, r):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            x = mu + phi * (x - mu) + sigma * z
            if record_path:
                x = numpyro.deterministic("x", x)
            numpyro.sample("r", dist.Normal(0.0, jnp.exp(x / 2.0)), obs=r)
            return x, None

        scan(step, x0, returns[1:])

    return model


def sv_factor_model(returns, *, num_particles, resampler=None, key=None, **factor_options):
    """`model()`: `sv_priors` and the particle factor of `returns` (`particle_factor`'s options)."""

    def model():
        mu, phi, sigma = sv_priors()
        ndr.particle_factor(
            "returns",
            stochastic_volatility(mu, phi, sigma),
            returns,
            num_particles=num_particles,
            resampler=resampler,
            key=key,
            **factor_options,
        )

    return model


# --- nonlinear growth ----------------------------------------------------------------------------

GROWTH_TRUE_SV = math.sqrt(10.0)
GROWTH_STEPS = 50
GROWTH_PRIOR_SCALE = 5.0  # sv ~ HalfNormal(5)


def growth_mean(x, t):
    """Transition mean of the nonlinear growth model."""
    return x / 2.0 + 25.0 * x / (1.0 + x**2) + 8.0 * jnp.cos(1.2 * t)


def growth(sv, guided=False):
    """The growth model; `guided` adds a linearised-emission (EKF-step) proposal."""
    proposal = None
    if guided:

        def proposal(x, t, y):
            mean = growth_mean(x, t)
            slope = mean / 10.0  # d(x^2/20)/dx at the transition mean
            gain = sv**2 * slope / (slope**2 * sv**2 + 1.0)
            return dist.Normal(
                mean + gain * (y - mean**2 / 20.0), sv * jnp.sqrt(1.0 - gain * slope)
            )

    return ndr.StateSpaceModel(
        dist.Normal(0.0, jnp.sqrt(5.0)),
        lambda x, t: dist.Normal(growth_mean(x, t), sv),
        lambda x, t: dist.Normal(x**2 / 20.0, 1.0),
        proposal,
    )


def growth_observations(num_steps=GROWTH_STEPS):
    """The growth model's data of `roughness.py` (and its reference posterior of sv)."""
    return ndr.simulate(jax.random.PRNGKey(0), growth(GROWTH_TRUE_SV), num_steps)[1]


def growth_latent_model(y):
    """The growth model as an ordinary NumPyro program (sv and a centred latent path)."""
    sv = numpyro.sample("sv", dist.HalfNormal(GROWTH_PRIOR_SCALE))
    x0 = numpyro.sample("x0", dist.Normal(0.0, jnp.sqrt(5.0)))
    numpyro.sample("y0", dist.Normal(x0**2 / 20.0, 1.0), obs=y[0])

    def step(x, inputs):
        t, y_t = inputs
        x = numpyro.sample("x", dist.Normal(growth_mean(x, t), sv))
        numpyro.sample("y", dist.Normal(x**2 / 20.0, 1.0), obs=y_t)
        return x, None

    scan(step, x0, (jnp.arange(1, y.shape[0]), y[1:]))


def growth_factor_model(y, *, num_particles, resampler, guided=False, key=None, **factor_options):
    """`model()`: sv ~ HalfNormal(5) and the particle factor of `y`.

    `guided`: `growth`'s proposal; `key`: a fixed filter key, else the seed handler's;
    `factor_options`: `particle_factor`'s others (e.g. `noise`).
    """

    def model():
        sv = numpyro.sample("sv", dist.HalfNormal(GROWTH_PRIOR_SCALE))
        ndr.particle_factor(
            "y",
            growth(sv, guided),
            y,
            num_particles=num_particles,
            resampler=resampler,
            key=key,
            **factor_options,
        )

    return model


# --- hierarchical: many AR(1)-plus-noise series --------------------------------------------------

SERIES_TRUE = {"phi": 0.8, "log_r": math.log(0.5), "mu": math.log(0.7), "tau": 0.3}
SERIES_GLOBALS = tuple(SERIES_TRUE)


def simulate_series(num_series, num_steps, seed=0):
    """Observations `(S, T)` of the hierarchical model at `SERIES_TRUE` (NumPy, float64)."""
    rng = np.random.default_rng(seed)
    true = SERIES_TRUE
    q = np.exp(true["mu"] + true["tau"] * rng.standard_normal(num_series))
    x = rng.standard_normal(num_series)
    rows = []
    for t in range(num_steps):
        if t:
            x = true["phi"] * x + q * rng.standard_normal(num_series)
        rows.append(x + math.exp(true["log_r"]) * rng.standard_normal(num_series))
    return np.stack(rows, axis=1)


def series_priors():
    """The four shared parameters `(phi, log_r, mu, tau)`."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    log_r = numpyro.sample("log_r", dist.Normal(SERIES_TRUE["log_r"], 0.5))
    mu = numpyro.sample("mu", dist.Normal(SERIES_TRUE["mu"], 0.5))
    tau = numpyro.sample("tau", dist.HalfNormal(0.5))
    return phi, log_r, mu, tau


def series(phi, q, r, *, guided=False):
    """The `StateSpaceModel` of all series: `q` has shape `(S,)`, a particle is `(S,)`.

    `guided` adds the locally optimal proposal.
    """

    def proposal(x, t, y):
        variance = 1.0 / (1.0 / q**2 + 1.0 / r**2)
        return dist.Normal(variance * (phi * x / q**2 + y / r**2), jnp.sqrt(variance))

    return ndr.StateSpaceModel(
        initial=dist.Normal(0.0, 1.0),
        transition=lambda x, t: dist.Normal(phi * x, q),
        emission=lambda x, t: dist.Normal(x, r),
        proposal=proposal if guided else None,
    )


def series_particle_model(observations, num_particles=32, *, guided=True, resampler=None, key=None):
    """The hierarchical model, one batched float32 filter for all series `(S, T)`; the factor."""
    phi, log_r, mu, tau = series_priors()
    with numpyro.plate("series", observations.shape[0]):
        z = numpyro.sample("z", dist.Normal())
        q = jnp.exp(mu + tau * z)
        return ndr.particle_factor(
            "y",
            series(phi, q, jnp.exp(log_r), guided=guided),
            observations,
            num_particles=num_particles,
            resampler=resampler or resampling.diffusion(num_steps=4),
            key=key,
            dtype=jnp.float32,
        )


def series_exact_log_likelihood(phi, q, log_r, observations):
    """Per-series Kalman log-likelihoods `(S,)`; observations `(S, T)`, NaN rows missing."""
    eye = jnp.eye(1, dtype=jnp.result_type(phi, float))

    def one(q_s, y_s):
        params = ndr.LinearGaussianParams(
            jnp.zeros(1, eye.dtype), eye, phi * eye, q_s**2 * eye, eye, jnp.exp(2 * log_r) * eye
        )
        return ndr.kalman_log_likelihood(params, y_s[:, None])

    return jax.vmap(one)(q, observations)


def series_exact_model(observations):
    """The hierarchical model with the exact per-series Kalman log-likelihoods."""
    phi, log_r, mu, tau = series_priors()
    with numpyro.plate("series", observations.shape[0]):
        z = numpyro.sample("z", dist.Normal())
        q = jnp.exp(mu + tau * z)
        numpyro.factor("y", series_exact_log_likelihood(phi, q, log_r, observations))


# --- hierarchical growth: 10 series, a per-series sv, shared hyperparameters ---------------------

HIERARCHY_SERIES = 10


def hierarchy_statics():
    """Log sv_s = m + s z_s (non-centred), m ~ N(log 3, 0.5^2), s ~ HalfNormal(0.5)."""
    m = numpyro.sample("m", dist.Normal(math.log(3.0), 0.5))
    s = numpyro.sample("s", dist.HalfNormal(0.5))
    with numpyro.plate("series", HIERARCHY_SERIES):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    return jnp.exp(m + s * z)


def hierarchy_filter_model(num_particles, **factor_options):
    def model(y):
        sv = hierarchy_statics()
        with numpyro.plate("series", HIERARCHY_SERIES):
            ndr.particle_factor("y", growth(sv), y, num_particles=num_particles, **factor_options)

    return model


def hierarchy_latent_model(y):
    sv = hierarchy_statics()
    with numpyro.plate("series", HIERARCHY_SERIES):
        x0 = numpyro.sample("x0", dist.Normal(0.0, jnp.sqrt(5.0)))
        numpyro.sample("y0", dist.Normal(x0**2 / 20.0, 1.0), obs=y[:, 0])

    def step(x, inputs):  # NumPyro's scan takes its plates inside the body
        t, y_t = inputs
        with numpyro.plate("series", HIERARCHY_SERIES):
            x = numpyro.sample("x", dist.Normal(growth_mean(x, t), sv))
            numpyro.sample("y", dist.Normal(x**2 / 20.0, 1.0), obs=y_t)
        return x, None

    scan(step, x0, (jnp.arange(1, y.shape[1]), y[:, 1:].T))


def hierarchy_observations(num_steps=50, seed=0):
    svs = jnp.exp(math.log(3.0) + 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 100), (10,)))
    keys = jax.random.split(jax.random.PRNGKey(seed), HIERARCHY_SERIES)
    paths = [ndr.simulate(k, growth(sv), num_steps)[1] for k, sv in zip(keys, svs, strict=True)]
    return jnp.stack(paths)


def series_likelihood_table(y, log_sv_grid, num_particles=1024, num_keys=16, seed=3):
    """Log-likelihood of each series on a grid of log sv: a log-mean over keys of estimates.

    Each series' likelihood depends on its own sv only, so the hierarchical posterior is
    exact up to this table (the mean of unbiased estimates, `num_keys * num_particles`
    particles a point) and its interpolation.
    """

    def point(key, y_s, log_sv):
        keys = jax.random.split(key, num_keys)
        estimates = jax.vmap(
            lambda k: (
                ndr.particle_filter(
                    k,
                    growth(jnp.exp(log_sv)),
                    y_s,
                    num_particles=num_particles,
                    resampler=ndr.resampling.systematic(),
                    ess_threshold=0.5,
                ).log_likelihood
            )
        )(keys)
        return jax.scipy.special.logsumexp(estimates) - math.log(num_keys)

    table = jax.jit(
        jax.vmap(lambda key, y_s: jax.lax.map(lambda g: point(key, y_s, g), log_sv_grid))
    )
    keys = jax.random.split(jax.random.PRNGKey(seed), y.shape[0])
    return table(keys, y)


def hierarchy_quadrature(log_sv_grid, table, num_m=161, num_s=160, num_z=241):
    """Posterior means and SDs of (m, s, z) by quadrature on the tabulated likelihoods.

    Given (m, s) the series are independent and each z_s is one-dimensional, so
    $p(m, s \\mid y) \\propto p(m)\\,p(s) \\prod_s \\int N(z; 0, 1)\\, L_s(e^{m + s z})\\,dz$
    on a grid of (m, s) (prior +-4 SD), a grid of z in [-6, 6] inside, and the moments of
    each z_s mixed over (m, s). `L_s` is interpolated linearly in log sv from `table`.
    """
    m_grid = jnp.linspace(math.log(3.0) - 2.0, math.log(3.0) + 2.0, num_m)
    s_grid = jnp.linspace(1e-3, 2.0, num_s)
    z = jnp.linspace(-6.0, 6.0, num_z)
    log_normal_z = -0.5 * z**2

    def at(m, s):
        log_sv = jnp.clip(m + s * z, log_sv_grid[0], log_sv_grid[-1])
        log_w = log_normal_z + jax.vmap(lambda t: jnp.interp(log_sv, log_sv_grid, t))(table)
        log_integral = jax.scipy.special.logsumexp(log_w, axis=1)  # (S,)
        w = jnp.exp(log_w - log_integral[:, None])
        return jnp.sum(log_integral), w @ z, w @ z**2

    grid = jax.jit(jax.vmap(jax.vmap(at, (None, 0)), (0, None)))
    log_marginal, z_mean, z_square = grid(m_grid, s_grid)  # (M, S_grid), (M, S_grid, series)
    log_prior = (
        -0.5 * ((m_grid[:, None] - math.log(3.0)) / 0.5) ** 2 - 0.5 * (s_grid[None, :] / 0.5) ** 2
    )
    log_post = log_prior + log_marginal
    weights = jnp.exp(log_post - jax.scipy.special.logsumexp(log_post))

    def moments(values):
        mean = jnp.sum(weights * values)
        return float(mean), float(jnp.sqrt(jnp.sum(weights * values**2) - mean**2))

    reference = {}
    for name, values in (
        ("m", m_grid[:, None] + 0 * s_grid),
        ("s", s_grid[None, :] + 0 * m_grid[:, None]),
    ):
        mean, sd = moments(values)
        reference[name] = {"mean": mean, "sd": sd}
    for index in range(table.shape[0]):
        mean = float(jnp.sum(weights * z_mean[..., index]))
        second = float(jnp.sum(weights * z_square[..., index]))
        reference[f"z[{index}]"] = {"mean": mean, "sd": math.sqrt(second - mean**2)}
    return reference
