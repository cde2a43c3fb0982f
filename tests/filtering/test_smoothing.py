"""particle_smoother and forecast against exact oracles (float64).

Oracles: dynamax's RTS smoother and the Kalman predictive (linear-Gaussian, d = 2), a dense
Gaussian conditional (missing observations), and grid / enumeration forward-backward for a
nonlinear model (stochastic volatility) and a discrete one (Poisson states).

Monte Carlo error: every comparison uses R independent repeats (independent keys, hence
independent forward filters), so the standard error includes the filter's own noise, not only
the spread of paths given one filter. With R repeats the standardised error of each compared
number is t-distributed with R - 1 degrees of freedom; a test compares many numbers at once
(e.g. 2 coordinates x 100 time steps), so its threshold is the Bonferroni quantile that keeps
the family-wise false-alarm rate at `ALPHA` (t with R - 1 dof at 1 - ALPHA / (2 * count)).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.stats

import numpyro_diffres as ndr
from benchmarks.models import stochastic_volatility as sv_model
from numpyro_diffres import resampling
from numpyro_diffres.smoothing import forecast, particle_smoother

ALPHA = 0.01
REPEATS = 16


def check_within_mc_error(estimates, exact, *, jackknife=None):
    """Assert that the repeat-average of `estimates` `(R, ...)` matches `exact` jointly.

    With `jackknife` (a function of a `(R', ...)` stack returning the estimate), the estimate
    and its standard error come from the jackknife over repeats instead of their mean.
    Returns the standardised errors.
    """
    estimates = np.asarray(estimates)
    repeats = estimates.shape[0]
    if jackknife is None:
        value = estimates.mean(0)
        se = estimates.std(0, ddof=1) / math.sqrt(repeats)
    else:
        value = jackknife(estimates)
        leave_one_out = np.stack(
            [jackknife(np.delete(estimates, r, axis=0)) for r in range(repeats)]
        )
        spread = leave_one_out - leave_one_out.mean(0)
        se = np.sqrt((repeats - 1) / repeats * np.sum(spread**2, axis=0))
    z = (value - np.asarray(exact)) / se
    threshold = scipy.stats.t.ppf(1 - ALPHA / (2 * z.size), repeats - 1)
    assert np.all(np.isfinite(z))
    assert np.max(np.abs(z)) < threshold, (np.max(np.abs(z)), threshold, np.argmax(np.abs(z)))
    return z


def pooled_variance(moments):
    """Variance from stacked per-repeat `(mean, mean of squares)` `(R, 2, ...)`."""
    mean = moments[:, 0].mean(0)
    return moments[:, 1].mean(0) - mean**2


def path_moments(paths):
    """Per-repeat mean and mean of squares over paths: `(R, M, T, ...) -> (R, 2, T, ...)`."""
    paths = np.asarray(paths, np.float64)
    return np.stack([paths.mean(1), (paths**2).mean(1)], axis=1)


# --- linear-Gaussian model, d = 2 -------------------------------------------------------------


def lg_params():
    return ndr.LinearGaussianParams(
        initial_mean=jnp.array([0.5, -0.5]),
        initial_cov=jnp.array([[1.0, 0.3], [0.3, 0.8]]),
        transition_matrix=jnp.array([[0.9, 0.2], [-0.2, 0.85]]),
        transition_cov=jnp.array([[0.5, 0.1], [0.1, 0.3]]),
        emission_matrix=jnp.array([[1.0, 0.5]]),
        emission_cov=jnp.array([[0.4]]),
    )


def dynamax_params(params):
    from dynamax.linear_gaussian_ssm import ParamsLGSSM
    from dynamax.linear_gaussian_ssm.inference import (
        ParamsLGSSMDynamics,
        ParamsLGSSMEmissions,
        ParamsLGSSMInitial,
    )

    d, p = params.initial_mean.shape[0], params.emission_matrix.shape[0]
    return ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=params.initial_mean, cov=params.initial_cov),
        dynamics=ParamsLGSSMDynamics(
            weights=params.transition_matrix,
            bias=jnp.zeros(d),
            input_weights=jnp.zeros((d, 0)),
            cov=params.transition_cov,
        ),
        emissions=ParamsLGSSMEmissions(
            weights=params.emission_matrix,
            bias=jnp.zeros(p),
            input_weights=jnp.zeros((p, 0)),
            cov=params.emission_cov,
        ),
    )


def rts_moments(params, observations):
    from dynamax.linear_gaussian_ssm import lgssm_smoother

    posterior = lgssm_smoother(dynamax_params(params), observations)
    variances = jnp.diagonal(posterior.smoothed_covariances, axis1=1, axis2=2)
    return np.asarray(posterior.smoothed_means), np.asarray(variances), posterior


def dense_smoothed_moments(params, observations):
    """Exact $E[x_t \\mid y_{obs}]$ and $Var$ from the joint Gaussian; NaN rows left out."""
    num_steps = observations.shape[0]
    F, Q = np.asarray(params.transition_matrix), np.asarray(params.transition_cov)
    H, R = np.asarray(params.emission_matrix), np.asarray(params.emission_cov)
    d = F.shape[0]
    means, covs = [np.asarray(params.initial_mean)], [np.asarray(params.initial_cov)]
    for _ in range(1, num_steps):
        means.append(F @ means[-1])
        covs.append(F @ covs[-1] @ F.T + Q)
    blocks = [[None] * num_steps for _ in range(num_steps)]
    for s in range(num_steps):
        propagated = covs[s]
        for t in range(s, num_steps):
            blocks[t][s] = propagated
            blocks[s][t] = propagated.T
            propagated = F @ propagated
    state_cov = np.block(blocks)
    state_mean = np.concatenate(means)
    observed = ~np.isnan(np.asarray(observations)).any(axis=1)
    emission = np.kron(np.eye(num_steps), H)[np.repeat(observed, H.shape[0])]
    noise = np.kron(np.eye(int(observed.sum())), R)
    cross = state_cov @ emission.T
    gain = np.linalg.solve(emission @ cross + noise, cross.T).T
    y = np.asarray(observations)[observed].reshape(-1)
    mean = state_mean + gain @ (y - emission @ state_mean)
    cov = state_cov - gain @ cross.T
    return mean.reshape(num_steps, d), np.diag(cov).reshape(num_steps, d)


TARGET_STEPS = 100
TARGET_PARTICLES = 512
TARGET_PATHS = 16


@pytest.fixture(scope="module")
def lg_data():
    with jax.enable_x64(True):
        params = lg_params()
        _, observations = ndr.simulate(
            jax.random.PRNGKey(0), ndr.linear_gaussian(params), TARGET_STEPS
        )
        return params, observations


@pytest.fixture(scope="module")
def target_draws(lg_data):
    """R independent FFBSi runs at the target setting: moments `(R, 2, T, 2)`, one jit."""
    params, observations = lg_data
    with jax.enable_x64(True):

        @jax.jit
        def moments(keys):
            def one(key):
                paths = particle_smoother(
                    key,
                    ndr.linear_gaussian(params),
                    observations,
                    num_particles=TARGET_PARTICLES,
                    num_paths=TARGET_PATHS,
                )
                return jnp.stack([paths.mean(0), (paths**2).mean(0)])

            return jax.vmap(one)(keys)

        return np.asarray(moments(jax.random.split(jax.random.PRNGKey(1), REPEATS)))


def test_target_smoothed_means_match_rts_at_every_step(lg_data, target_draws):
    # TARGET: N = 512, T = 100, d = 2. The smoothed mean of each coordinate at each of the
    # 100 steps is within the family-wise (Bonferroni) t-threshold of 200 comparisons; see
    # the module docstring. (The per-comparison "3 standard errors" would fail somewhere in
    # 200 comparisons by chance alone about half the time.)
    params, observations = lg_data
    with jax.enable_x64(True):
        means, variances, _ = rts_moments(params, observations)
    z = check_within_mc_error(target_draws[:, 0], means)
    assert z.shape == (TARGET_STEPS, 2)
    # The test has resolution: the standard error is a small fraction of the posterior SD.
    se = target_draws[:, 0].std(0, ddof=1) / math.sqrt(REPEATS)
    assert np.all(se < 0.15 * np.sqrt(variances))


def test_smoothed_variances_match_rts(lg_data, target_draws):
    params, observations = lg_data
    with jax.enable_x64(True):
        _, variances, _ = rts_moments(params, observations)
    total = REPEATS * TARGET_PATHS
    check_within_mc_error(
        target_draws, variances, jackknife=lambda m: pooled_variance(m) * total / (total - 1)
    )


def test_smoothing_is_not_filtering(lg_data, target_draws):
    # Canary for the oracle comparison: the filtering means (what genealogy-free forward
    # draws would give) differ from the smoothed ones by many standard errors.
    params, observations = lg_data
    with jax.enable_x64(True):
        filtered, _ = ndr.kalman_filtered_moments(params, observations)
    with pytest.raises(AssertionError):
        check_within_mc_error(target_draws[:, 0], np.asarray(filtered))


def test_genealogy_matches_the_exact_smoother_on_a_short_series(lg_data):
    # Path degeneracy grows with T: at T = 10 and N = 512 genealogy tracing is still accurate.
    params, observations = lg_data
    short = observations[:10]
    with jax.enable_x64(True):
        paths = jax.jit(
            jax.vmap(
                lambda key: particle_smoother(
                    key,
                    ndr.linear_gaussian(params),
                    short,
                    num_particles=512,
                    num_paths=32,
                    method="genealogy",
                )
            )
        )(jax.random.split(jax.random.PRNGKey(2), REPEATS))
        means, variances, _ = rts_moments(params, short)
    moments = path_moments(paths)
    check_within_mc_error(moments[:, 0], means)
    check_within_mc_error(moments, variances, jackknife=pooled_variance)


def guided(params):
    """The LG model with its locally optimal proposal (scalar observation)."""
    F, Q = params.transition_matrix, params.transition_cov
    H, R = params.emission_matrix, params.emission_cov
    gain = Q @ H.T @ jnp.linalg.inv(H @ Q @ H.T + R)
    cov = Q - gain @ H @ Q

    def proposal(x, t, y):
        prior = F @ x
        return dist.MultivariateNormal(prior + gain @ (y - H @ prior), cov)

    model = ndr.linear_gaussian(params)
    return ndr.StateSpaceModel(model.initial, model.transition, model.emission, proposal)


@pytest.mark.parametrize("case", ["guided", "missing", "guided_missing"])
def test_guided_proposal_and_missing_observations_match_the_dense_oracle(lg_data, case):
    # With a guided proposal, a missing step moves by the transition (the proposal would see
    # only the filter's filler value): guided_missing checks that combination.
    params, observations = lg_data
    data = np.array(observations[:20])
    if case.endswith("missing"):
        data[[3, 4, 12, 19]] = np.nan
    with jax.enable_x64(True):
        model = guided(params) if case.startswith("guided") else ndr.linear_gaussian(params)
        # The dense oracle agrees with dynamax where nothing is missing.
        full_means, full_variances = dense_smoothed_moments(params, observations[:20])
        rts_means, rts_variances, _ = rts_moments(params, observations[:20])
        np.testing.assert_allclose(full_means, rts_means, atol=1e-8)
        np.testing.assert_allclose(full_variances, rts_variances, atol=1e-8)
        means, variances = dense_smoothed_moments(params, data)
        paths = jax.jit(
            jax.vmap(
                lambda key: particle_smoother(
                    key, model, jnp.asarray(data), num_particles=256, num_paths=32
                )
            )
        )(jax.random.split(jax.random.PRNGKey(3), REPEATS))
    moments = path_moments(paths)
    check_within_mc_error(moments[:, 0], means)
    check_within_mc_error(moments, variances, jackknife=pooled_variance)


# --- forecasts --------------------------------------------------------------------------------


def kalman_forecast(params, observations, horizon):
    """Exact predictive means and variances of $x_{T:T+H-1}$ and $y_{T:T+H-1}$."""
    means, covs = ndr.kalman_filtered_moments(params, observations)
    F, Q = np.asarray(params.transition_matrix), np.asarray(params.transition_cov)
    H, R = np.asarray(params.emission_matrix), np.asarray(params.emission_cov)
    mean, cov = np.asarray(means[-1]), np.asarray(covs[-1])
    rows = []
    for _ in range(horizon):
        mean, cov = F @ mean, F @ cov @ F.T + Q
        rows.append((mean, np.diag(cov), H @ mean, np.diag(H @ cov @ H.T + R)))
    return [np.stack(column) for column in zip(*rows, strict=True)]


def test_forecast_matches_the_kalman_predictive(lg_data):
    params, observations = lg_data
    data = observations[:30]
    horizon = 6
    with jax.enable_x64(True):
        states, emitted = jax.jit(
            jax.vmap(
                lambda key: forecast(
                    key,
                    ndr.linear_gaussian(params),
                    data,
                    horizon,
                    num_particles=512,
                    num_paths=64,
                )
            )
        )(jax.random.split(jax.random.PRNGKey(4), REPEATS))
        state_means, state_variances, observation_means, observation_variances = kalman_forecast(
            params, data, horizon
        )
    assert states.shape == (REPEATS, 64, horizon, 2)
    assert emitted.shape == (REPEATS, 64, horizon, 1)
    for draws, means, variances in (
        (states, state_means, state_variances),
        (emitted, observation_means, observation_variances),
    ):
        moments = path_moments(draws)
        check_within_mc_error(moments[:, 0], means)
        check_within_mc_error(moments, variances, jackknife=pooled_variance)


# --- nonlinear: stochastic volatility against grid forward-backward -----------------------------

SV = {"mu": -1.0, "phi": 0.9, "sigma": 0.5}


def grid_smoother(observations, mu, phi, sigma, points=1201):
    """Forward-backward on a fine grid: smoothed means and variances of the scalar state."""
    scale = sigma / math.sqrt(1 - phi**2)
    grid = np.linspace(mu - 8 * scale, mu + 8 * scale, points)
    prior = scipy.stats.norm.pdf(grid, mu, scale)
    kernel = scipy.stats.norm.pdf(grid[None, :], mu + phi * (grid[:, None] - mu), sigma)
    likelihood = scipy.stats.norm.pdf(
        np.asarray(observations)[:, None], 0.0, np.exp(grid / 2)[None, :]
    )
    forward = [prior * likelihood[0]]
    forward[0] /= forward[0].sum()
    for t in range(1, len(observations)):
        alpha = (forward[-1] @ kernel) * likelihood[t]
        forward.append(alpha / alpha.sum())
    backward = [np.ones(points)]
    for t in range(len(observations) - 1, 0, -1):
        beta = kernel @ (likelihood[t] * backward[0])
        backward.insert(0, beta / beta.sum())
    marginals = np.stack(forward) * np.stack(backward)
    marginals /= marginals.sum(1, keepdims=True)
    means = marginals @ grid
    return means, marginals @ grid**2 - means**2


@pytest.mark.parametrize("dtype", [None, jnp.float32], ids=["float64", "float32"])
def test_stochastic_volatility_matches_grid_forward_backward(dtype):
    with jax.enable_x64(True):
        _, returns = ndr.simulate(jax.random.PRNGKey(5), sv_model(**SV), 30)
        paths = jax.jit(
            jax.vmap(
                lambda key: particle_smoother(
                    key,
                    sv_model(**SV),
                    returns,
                    num_particles=256,
                    num_paths=32,
                    dtype=dtype,
                )
            )
        )(jax.random.split(jax.random.PRNGKey(6), REPEATS))
    assert paths.dtype == (jnp.float64 if dtype is None else jnp.float32)
    means, variances = grid_smoother(returns, **SV)
    moments = path_moments(paths)
    check_within_mc_error(moments[:, 0], means)
    check_within_mc_error(moments, variances, jackknife=pooled_variance)


# --- discrete states: Poisson chain against enumeration ----------------------------------------

POISSON_SUPPORT = 60


def poisson_model(rate=1.0, persistence=0.6):
    return ndr.StateSpaceModel(
        initial=dist.Poisson(3.0),
        transition=lambda x, t: dist.Poisson(persistence * x + rate),
        emission=lambda x, t: dist.Normal(x.astype(jnp.result_type(float)), 1.0),
    )


def enumerated_smoother(observations, rate=1.0, persistence=0.6):
    states = np.arange(POISSON_SUPPORT)
    prior = scipy.stats.poisson.pmf(states, 3.0)
    kernel = scipy.stats.poisson.pmf(states[None, :], persistence * states[:, None] + rate)
    observations = np.asarray(observations)
    likelihood = np.where(
        np.isnan(observations)[:, None],
        1.0,
        scipy.stats.norm.pdf(np.nan_to_num(observations)[:, None], states[None, :], 1.0),
    )
    forward = [prior * likelihood[0] / (prior * likelihood[0]).sum()]
    for t in range(1, len(observations)):
        alpha = (forward[-1] @ kernel) * likelihood[t]
        forward.append(alpha / alpha.sum())
    backward = [np.ones(POISSON_SUPPORT)]
    for t in range(len(observations) - 1, 0, -1):
        beta = kernel @ (likelihood[t] * backward[0])
        backward.insert(0, beta / beta.sum())
    marginals = np.stack(forward) * np.stack(backward)
    marginals /= marginals.sum(1, keepdims=True)
    means = marginals @ states
    return means, marginals @ states**2 - means**2


@pytest.mark.parametrize("method", ["backward", "genealogy"])
def test_poisson_states_match_enumeration(method):
    with jax.enable_x64(True):
        _, observations = ndr.simulate(jax.random.PRNGKey(7), poisson_model(), 12)
        observations = observations.at[5].set(jnp.nan)
        paths = jax.jit(
            jax.vmap(
                lambda key: particle_smoother(
                    key,
                    poisson_model(),
                    observations,
                    num_particles=256,
                    num_paths=32,
                    method=method,
                    resampler=resampling.multinomial(),
                )
            )
        )(jax.random.split(jax.random.PRNGKey(8), REPEATS))
    assert jnp.issubdtype(paths.dtype, jnp.integer)
    means, variances = enumerated_smoother(observations)
    moments = path_moments(paths)
    check_within_mc_error(moments[:, 0], means)
    check_within_mc_error(moments, variances, jackknife=pooled_variance)


# --- impossible parameters, bad arguments ------------------------------------------------------


def test_impossible_parameters_give_nan_paths_not_an_error():
    observations = jnp.zeros(8)

    @jax.jit
    def draws(sigma):
        # Built inside jit, as in a NumPyro model: no eager validation of the scale.
        model = sv_model(-1.0, 0.9, sigma)
        key = jax.random.PRNGKey(0)
        paths = particle_smoother(key, model, observations, num_particles=16, num_paths=3)
        return paths, *forecast(key, model, observations, 4, num_particles=16, num_paths=3)

    for sigma in (jnp.nan, -1.0):
        paths, states, emitted = draws(sigma)
        assert paths.shape == (3, 8) and states.shape == (3, 4) and emitted.shape == (3, 4)
        assert np.all(np.isnan(paths)) and np.all(np.isnan(states)) and np.all(np.isnan(emitted))
    assert all(np.all(np.isfinite(values)) for values in draws(0.5))
    # Integer states cannot hold NaN: the smallest integer marks them.
    counts = jax.jit(
        lambda rate: particle_smoother(
            jax.random.PRNGKey(0),
            poisson_model(rate=rate),
            jnp.zeros(6),
            num_particles=16,
            num_paths=2,
        )
    )(jnp.nan)
    assert np.all(counts == np.iinfo(counts.dtype).min)


SMALL = {"num_particles": 8, "num_paths": 2}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_paths": 0}, ValueError, "num_paths"),
        ({"num_paths": 2.0}, TypeError, "num_paths"),
        ({"num_particles": 1}, ValueError, "num_particles"),
        ({"method": "forward"}, ValueError, "method"),
        ({"resampler": resampling.diffusion()}, TypeError, "index resampler"),
        ({"dtype": jnp.int32}, TypeError, "dtype"),
    ],
)
def test_bad_smoother_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        particle_smoother(
            jax.random.PRNGKey(0), sv_model(**SV), jnp.zeros(5), **{**SMALL, **kwargs}
        )


@pytest.mark.parametrize(
    ("horizon", "error"), [(0, ValueError), (2.5, TypeError), (jnp.int32(3), TypeError)]
)
def test_bad_forecast_horizon(horizon, error):
    with pytest.raises(error, match="num_steps_ahead"):
        forecast(jax.random.PRNGKey(0), sv_model(**SV), jnp.zeros(5), horizon, **SMALL)


def test_bad_model_and_observations():
    with pytest.raises(TypeError, match="StateSpaceModel"):
        particle_smoother(jax.random.PRNGKey(0), lambda x: x, jnp.zeros(5), **SMALL)
    with pytest.raises(ValueError, match="emission"):
        particle_smoother(jax.random.PRNGKey(0), sv_model(**SV), jnp.zeros((5, 2)), **SMALL)
