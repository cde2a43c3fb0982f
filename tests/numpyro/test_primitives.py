"""particle_factor inside NumPyro models: SVI, Predictive, log_likelihood, ArviZ, NUTS.

The shared model is a 1-D AR(1)-plus-noise linear-Gaussian SSM with unknown transition
coefficient `phi` and log noise scales `log_q`, `log_r` (proper priors); its exact twin puts the
Kalman log-likelihood into `numpyro.factor` (run in float64).
"""

import dataclasses
import functools
import math
import re

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO, autoguide
from numpyro.infer.util import log_density, potential_energy

import numpyro_diffres as ndr
from numpyro_diffres import resampling

T = 30
NUM_PARTICLES = 64
TRUE = {"phi": 0.8, "log_q": math.log(0.6), "log_r": math.log(0.8)}
NAMES = tuple(TRUE)


def lg_params(phi, log_q, log_r):
    dtype = jnp.result_type(phi, float)
    eye = jnp.eye(1, dtype=dtype)
    return ndr.LinearGaussianParams(
        jnp.zeros(1, dtype),
        eye,
        phi * eye,
        jnp.exp(2 * log_q) * eye,
        eye,
        jnp.exp(2 * log_r) * eye,
    )


def priors():
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    log_q = numpyro.sample("log_q", dist.Normal(TRUE["log_q"], 0.5))
    log_r = numpyro.sample("log_r", dist.Normal(TRUE["log_r"], 0.5))
    return phi, log_q, log_r


def particle_model(
    observations=None,
    *,
    num_steps=T,
    num_particles=NUM_PARTICLES,
    resampler=None,
    key=None,
    record=False,
    trajectory=False,
):
    model = ndr.linear_gaussian(lg_params(*priors()))
    result = None
    if observations is not None:
        result = ndr.particle_factor(
            "y",
            model,
            jnp.asarray(observations),
            num_particles=num_particles,
            resampler=resampler,
            key=key,
            record=record,
        )
    if trajectory:
        ndr.sample_trajectory("path", model, num_steps)
    return result


def exact_model(observations):
    params = lg_params(*priors())
    numpyro.factor("y", ndr.kalman_log_likelihood(params, jnp.asarray(observations)))


def simulate_observations(num_steps=T, seed=0):
    with jax.enable_x64(True):
        model = ndr.linear_gaussian(lg_params(*(jnp.asarray(v) for v in TRUE.values())))
        _, observations = ndr.simulate(jax.random.PRNGKey(seed), model, num_steps)
        return np.asarray(observations)


@pytest.fixture(scope="module")
def observations():
    return simulate_observations()


FIXED = {name: jnp.asarray(value) for name, value in TRUE.items()}


def run_fixed(model, *args, seed=None, **kwargs):
    """Run `model` at the true parameters, optionally under a seed handler."""
    substituted = handlers.substitute(model, data=FIXED)
    if seed is not None:
        substituted = handlers.seed(substituted, rng_seed=seed)
    return substituted(*args, **kwargs)


# --- SVI ------------------------------------------------------------------------------------


def fit_svi(model, guide_class, observations, num_steps, **model_kwargs):
    """SVI from a fixed key; returns the guide's median (its location) of each parameter."""
    guide = guide_class(model)
    # Decaying steps: large at first, small at the end, so the last iterate sits at the optimum
    # to well within the tolerance despite the stochastic (particle and guide) gradients.
    schedule = lambda step: 0.05 * 0.01 ** (step / num_steps)  # noqa: E731
    svi = SVI(model, guide, numpyro.optim.Adam(schedule), Trace_ELBO())

    # Initialisation and all steps in one compiled program (svi.run would also run the filter
    # eagerly once during initialisation, which costs more than the 1000 steps).
    @jax.jit
    def fit(key):
        state = svi.init(key, observations, **model_kwargs)

        def step(state, _):
            return svi.update(state, observations, **model_kwargs)

        state, _ = jax.lax.scan(step, state, None, length=num_steps)
        return svi.get_params(state)

    params = fit(jax.random.PRNGKey(0))
    return {name: float(value) for name, value in guide.median(params).items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("guide_class", "num_steps"), [(autoguide.AutoDelta, 500), (autoguide.AutoNormal, 1000)]
)
def test_svi_reaches_the_exact_likelihood_optimum(observations, guide_class, num_steps):
    # Same guide, optimiser and SVI key on both; the particle model gets a fresh filter key per
    # step from the seed handler (stochastic gradients). AutoNormal's own sampling noise needs
    # more steps to settle than AutoDelta.
    with jax.enable_x64(True):
        exact = fit_svi(exact_model, guide_class, observations, num_steps)
    particle = fit_svi(
        particle_model,
        guide_class,
        observations,
        num_steps,
        resampler=resampling.diffusion(num_steps=4),
    )
    # The exact optimum must not be the prior centre, or matching it would prove nothing.
    assert abs(exact["phi"]) > 0.3, exact
    for name in NAMES:
        assert abs(particle[name] - exact[name]) < 0.1, (name, particle, exact)


# --- Predictive, log_likelihood --------------------------------------------------------------


def test_prior_predictive_paths():
    draws = 5
    samples = Predictive(particle_model, num_samples=draws)(jax.random.PRNGKey(1), trajectory=True)
    assert samples["phi"].shape == (draws,)
    assert samples["path_states"].shape == (draws, T, 1)
    assert samples["path_observations"].shape == (draws, T, 1)
    # A fresh key per draw: the paths differ.
    assert not np.allclose(samples["path_states"][0], samples["path_states"][1])


def test_posterior_predictive_uses_the_given_parameters():
    draws = 400
    posterior = {
        "phi": jnp.full((draws,), 0.95),
        "log_q": jnp.full((draws,), math.log(0.1)),
        "log_r": jnp.full((draws,), math.log(0.01)),
    }
    samples = Predictive(particle_model, posterior_samples=posterior)(
        jax.random.PRNGKey(2), trajectory=True
    )
    states = np.asarray(samples["path_states"])
    observations = np.asarray(samples["path_observations"])
    assert states.shape == (draws, T, 1) and observations.shape == (draws, T, 1)
    # The paths follow the given parameters, not prior draws: the least-squares AR(1)
    # coefficient over all draws is 0.95 within 5 standard errors q / sqrt(sum x_{t-1}^2), and
    # the observation noise has standard deviation r = 0.01 within 5 standard errors.
    previous, current = states[:, :-1, 0].ravel(), states[:, 1:, 0].ravel()
    coefficient = np.sum(previous * current) / np.sum(previous**2)
    assert abs(coefficient - 0.95) < 5 * 0.1 / math.sqrt(np.sum(previous**2))
    residual = (observations - states).ravel()
    assert abs(residual.std() - 0.01) < 5 * 0.01 / math.sqrt(2 * residual.size)


# One jitted function per (seed handler?, explicit key?) combination, shared by the tests below
# so that each combination compiles once.
@functools.cache
def factor_value(seeded, explicit):
    def value(params, observations, seed_key, key):
        model = handlers.substitute(particle_model, data=params)
        if seeded:
            model = handlers.seed(model, rng_seed=seed_key)
        result = model(observations, **({"key": key} if explicit else {}))
        return result.log_likelihood_increments

    return jax.jit(value)


def test_log_likelihood_is_per_time_and_uses_the_fallback_key(observations):
    samples = {
        "phi": jnp.array([0.5, 0.8, 0.9]),
        "log_q": jnp.log(jnp.array([0.5, 0.6, 0.7])),
        "log_r": jnp.log(jnp.array([0.7, 0.8, 0.9])),
    }
    log_likelihood = jax.jit(lambda s, y: numpyro.infer.log_likelihood(particle_model, s, y))(
        samples, observations
    )
    assert set(log_likelihood) == {"y"}
    assert log_likelihood["y"].shape == (3, T)
    # No seed handler there: the factor uses the fixed key PRNGKey(0).
    explicit = factor_value(seeded=False, explicit=True)
    for i in range(3):
        params = {name: samples[name][i] for name in NAMES}
        expected = explicit(params, observations, None, jax.random.PRNGKey(0))
        np.testing.assert_allclose(log_likelihood["y"][i], expected, rtol=1e-5, atol=1e-5)


# --- key semantics ---------------------------------------------------------------------------


def test_explicit_key_wins_over_the_seed_handler(observations):
    key = jax.random.PRNGKey(7)
    seeded = factor_value(seeded=True, explicit=True)
    first = seeded(FIXED, observations, jax.random.PRNGKey(1), key)
    second = seeded(FIXED, observations, jax.random.PRNGKey(2), key)
    unseeded = factor_value(seeded=False, explicit=True)(FIXED, observations, None, key)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, unseeded)
    other = factor_value(seeded=False, explicit=True)(
        FIXED, observations, None, jax.random.PRNGKey(8)
    )
    assert not np.array_equal(first, other)


def test_seed_handler_gives_fresh_noise(observations):
    seeded = factor_value(seeded=True, explicit=False)
    first = seeded(FIXED, observations, jax.random.PRNGKey(1), None)
    again = seeded(FIXED, observations, jax.random.PRNGKey(1), None)
    other = seeded(FIXED, observations, jax.random.PRNGKey(2), None)
    np.testing.assert_array_equal(first, again)
    assert float(first.sum()) != float(other.sum())


def test_no_seed_handler_falls_back_to_key_zero(observations):
    unseeded = factor_value(seeded=False, explicit=False)(FIXED, observations, None, None)
    explicit = factor_value(seeded=False, explicit=True)(
        FIXED, observations, None, jax.random.PRNGKey(0)
    )
    assert np.all(np.isfinite(unseeded))
    np.testing.assert_array_equal(unseeded, explicit)


@pytest.mark.parametrize(
    "key",
    [0, np.array([0, 1, 2], np.uint32), jnp.zeros((2, 2), jnp.uint32), jnp.zeros(2)],
    ids=["int", "three-words", "batch-of-keys", "float"],
)
def test_wrong_key_type_is_a_type_error(observations, key):
    with pytest.raises(TypeError, match="key"):
        run_fixed(particle_model, observations, key=key)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(T,), (T, 2)], ids=["no-event-axis", "wrong-width"])
def test_observations_not_fitting_the_emission(shape):
    with pytest.raises(ValueError, match="emission"):
        run_fixed(particle_model, np.zeros(shape), seed=0)


def test_duplicate_site_name_raises_numpyros_error(observations):
    def numpyro_duplicate():
        numpyro.sample("phi", dist.Normal())
        numpyro.factor("phi", 0.0)

    def factor_duplicate():
        model = ndr.linear_gaussian(lg_params(*priors()))
        ndr.particle_factor("phi", model, jnp.asarray(observations), num_particles=8)

    def trace(model):
        # Tracing is enough (and much cheaper than running the filter eagerly).
        return jax.eval_shape(lambda: handlers.trace(handlers.seed(model, 0)).get_trace() and 0)

    with pytest.raises(Exception) as reference:
        trace(numpyro_duplicate)
    with pytest.raises(type(reference.value), match=re.escape(str(reference.value))):
        trace(factor_duplicate)


def test_non_callable_resampler_is_a_type_error(observations):
    with pytest.raises(TypeError, match="resampler"):
        run_fixed(particle_model, observations, resampler="diffusion", seed=0)


def test_non_string_name_is_a_type_error(observations):
    model = ndr.linear_gaussian(lg_params(*FIXED.values()))
    with pytest.raises(TypeError, match="name"):
        handlers.seed(ndr.particle_factor, 0)(3, model, observations, num_particles=8)


# --- impossible parameters, NUTS and ArviZ ------------------------------------------------------


def scale_model(observations, num_particles=16):
    """Emission scale `r` with a Normal prior: r <= 0 is an impossible parameter.

    `validate_args=False`: NumPyro validates eagerly built distributions by default, so the
    eager prior draw that `az.from_numpyro` makes would raise for r <= 0 (as in any NumPyro
    model); with it the filter's own guard gives such a draw zero likelihood instead.
    """
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    r = numpyro.sample("r", dist.Normal(0.3, 0.5))
    model = ndr.StateSpaceModel(
        initial=dist.Normal(jnp.zeros(1), 1.0).to_event(1),
        transition=lambda x, t: dist.Normal(phi * x, 0.6).to_event(1),
        emission=lambda x, t: dist.Normal(x, r, validate_args=False).to_event(1),
    )
    ndr.particle_factor(
        "y",
        model,
        jnp.asarray(observations),
        num_particles=num_particles,
        resampler=resampling.diffusion(num_steps=4),
    )


def test_impossible_parameter_gives_infinite_potential_with_finite_gradient(observations):
    @jax.jit
    def potential(r):
        params = {"phi": jnp.asarray(0.5), "r": r}
        return jax.value_and_grad(
            lambda r: potential_energy(scale_model, (observations,), {}, {**params, "r": r})
        )(r)

    value, gradient = potential(jnp.asarray(-0.2))
    assert value == np.inf
    assert np.isfinite(gradient)
    value, gradient = potential(jnp.asarray(0.5))
    assert np.isfinite(value) and np.isfinite(gradient)


@pytest.fixture(scope="module")
def scale_mcmc(observations):
    # Small on purpose: it checks that NUTS survives a prior with mass on impossible values and
    # feeds the ArviZ plumbing tests; it is not a statistical check.
    mcmc = MCMC(
        NUTS(scale_model),
        num_warmup=30,
        num_samples=40,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(4), observations)
    return mcmc


@pytest.mark.slow
def test_nuts_never_returns_nan_when_the_prior_covers_impossible_values(scale_mcmc):
    r = np.asarray(scale_mcmc.get_samples()["r"])
    assert r.shape == (80,)
    assert np.all(np.isfinite(r))
    # The likelihood is zero for r <= 0, so no posterior draw may land there.
    assert np.all(r > 0)


@pytest.mark.slow
def test_arviz_log_likelihood_group_has_a_time_dimension(scale_mcmc):
    idata = az.from_numpyro(scale_mcmc)
    assert "log_likelihood" in idata.groups()
    y = idata.log_likelihood["y"]
    assert y.dims[:2] == ("chain", "draw")
    assert y.shape == (2, 40, T)
    assert np.all(np.isfinite(y.values))
    summary = az.summary(idata, var_names=["phi", "r"])
    assert list(summary.index) == ["phi", "r"]
    assert np.all(np.isfinite(summary["mean"].to_numpy()))
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    assert loo.n_data_points == T


# --- record ------------------------------------------------------------------------------------


def test_record_adds_deterministic_sites(observations):
    shapes = {"y_filtered_mean": (T, 1), "y_filtered_variance": (T, 1), "y_ess": (T,)}
    model = handlers.seed(handlers.substitute(particle_model, data=FIXED), 0)
    site_types = {}

    def recorded_and_expected(key, record=True):
        trace = handlers.trace(model).get_trace(observations, key=key, record=record)
        # Site types are strings: collect them while tracing.
        site_types[record] = {name: site["type"] for name, site in trace.items()}
        expected = ndr.particle_filter(
            key,
            ndr.linear_gaussian(lg_params(*FIXED.values())),
            jnp.asarray(observations),
            num_particles=NUM_PARTICLES,
        )
        return {name: trace[name]["value"] for name in shapes if name in trace}, expected

    recorded, expected = jax.jit(recorded_and_expected)(jax.random.PRNGKey(5))
    fields = {
        "y_filtered_mean": expected.filtered_mean,
        "y_filtered_variance": expected.filtered_variance,
        "y_ess": expected.ess,
    }
    for name, shape in shapes.items():
        assert site_types[True][name] == "deterministic"
        assert recorded[name].shape == shape
        np.testing.assert_allclose(recorded[name], fields[name], rtol=1e-5, atol=1e-6)
    assert np.all((expected.ess > 0) & (expected.ess <= NUM_PARTICLES * (1 + 1e-5)))
    assert site_types[True]["y"] == "sample"
    jax.eval_shape(lambda key: recorded_and_expected(key, record=False), jax.random.PRNGKey(5))
    assert not set(shapes) & set(site_types[False])


# --- headline: NUTS on the particle likelihood against NUTS on the exact likelihood --------------

HEADLINE_PARTICLES = 64
SURFACE_PARTICLES = 128


def guided_linear_gaussian(phi, log_q, log_r):
    """The shared model with its locally optimal proposal $q(x_t \\mid x_{t-1}, y_t)$.

    For $x_t = \\phi x_{t-1} + N(0, q^2)$, $y_t = x_t + N(0, r^2)$ the proposal is Gaussian with
    variance $s^2 = (q^{-2} + r^{-2})^{-1}$ and mean $s^2(\\phi x_{t-1}/q^2 + y_t/r^2)$.
    """
    q2, r2 = jnp.exp(2 * log_q), jnp.exp(2 * log_r)
    variance = 1.0 / (1.0 / q2 + 1.0 / r2)

    def proposal(x, t, y):
        mean = variance * (phi * x / q2 + y / r2)
        return dist.Normal(mean, jnp.sqrt(variance)).to_event(1)

    return dataclasses.replace(ndr.linear_gaussian(lg_params(phi, log_q, log_r)), proposal=proposal)


def guided_model(observations, resampler=None):
    model = guided_linear_gaussian(*priors())
    ndr.particle_factor(
        "y",
        model,
        jnp.asarray(observations),
        num_particles=HEADLINE_PARTICLES,
        resampler=resampler,
    )


def nuts_samples(model, observations, num_warmup, num_samples, seed, **kwargs):
    # Vectorized chains: on CPU a step of two chains side by side costs little more than one,
    # and NumPyro then finds the initial points in one compiled search, not op by op.
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), observations, extra_fields=("diverging",), **kwargs)
    return mcmc


def exact_posterior_moments(observations, num_points=31):
    """Means and SDs of the exact posterior of (phi, log_q, log_r) by quadrature (float64).

    A grid over the prior's range locates the posterior; a second grid over its mean +- 6 SD
    (cut to phi's support) gives the moments, with trapezoid weights since phi's posterior need
    not vanish at the edge of its support. No Monte Carlo error, unlike NUTS on the exact
    likelihood, and far cheaper.
    """
    y = jnp.asarray(observations, jnp.float64)
    log_joint = jax.jit(jax.vmap(lambda values: log_density(exact_model, (y,), {}, values)[0]))
    bounds = {"phi": (-0.999, 0.999)}
    bounds |= {name: (TRUE[name] - 2.5, TRUE[name] + 2.5) for name in ("log_q", "log_r")}
    trapezoid = np.ones(num_points)
    trapezoid[[0, -1]] = 0.5
    for _ in range(2):
        axes = [np.linspace(*bounds[name], num_points) for name in NAMES]
        mesh = np.meshgrid(*axes, indexing="ij")
        values = {name: jnp.asarray(grid.ravel()) for name, grid in zip(NAMES, mesh, strict=True)}
        log_weights = np.asarray(log_joint(values)).reshape(mesh[0].shape)
        weights = np.exp(log_weights - log_weights.max())
        weights *= functools.reduce(np.multiply.outer, [trapezoid] * len(NAMES))
        weights /= weights.sum()
        moments = {}
        for name, grid in zip(NAMES, mesh, strict=True):
            mean = float(np.sum(weights * grid))
            moments[name] = (mean, float(np.sqrt(np.sum(weights * (grid - mean) ** 2))))
        bounds = {name: (mean - 6 * sd, mean + 6 * sd) for name, (mean, sd) in moments.items()}
        bounds["phi"] = (max(bounds["phi"][0], -0.999), min(bounds["phi"][1], 0.999))
    return moments


@pytest.mark.slow
def test_nuts_on_the_diffusion_factor_recovers_the_exact_posterior(observations):
    # Sizing, measured on the loaded 2-core CPU (float32): the shared T = 30 data, N = 64,
    # K = 4 diffusion steps, 2 vectorized chains of 150 warm-up + 350 draws, about 7 leapfrog
    # steps per draw (with 250 draws phi's SD ratio came out at 0.79-1.01 over six seeds, with
    # 350 at 0.88-0.97). The exact posterior is
    # computed by quadrature. Why the guided proposal: the fixed-noise posterior mean sits
    # about 0.25-0.3 posterior SD (RMS over noise keys, linearised at the exact MAP) from the
    # exact one with the bootstrap proposal at N = 128, with a systematic part of about 0.1 SD:
    # too close to the 0.3 SD tolerance. With the locally optimal proposal the fixed-noise
    # surrogate posterior itself (quadrature of the same potential) sits 0.03, 0.08 and 0.06
    # SD from the exact means (phi, log_q, log_r) at N = 64 on these data, with SD ratios
    # 0.93-1.01 (N = 128 was no closer: 0.01, 0.10, 0.07); at most 0.18 SD on three other
    # data sets.
    with jax.enable_x64(True):
        exact = exact_posterior_moments(observations)
    particle = nuts_samples(
        guided_model, observations, 150, 350, seed=11, resampler=resampling.diffusion(num_steps=4)
    )
    assert int(particle.get_extra_fields()["diverging"].sum()) == 0
    grouped = particle.get_samples(group_by_chain=True)
    for name in NAMES:
        draws = np.asarray(grouped[name])
        assert az.rhat(draws) < 1.05, name
        mean, sd = draws.mean(), draws.std()
        exact_mean, exact_sd = exact[name]
        assert abs(mean - exact_mean) < 0.3 * exact_sd, (name, mean, sd, exact_mean, exact_sd)
        assert abs(sd / exact_sd - 1.0) < 0.3, (name, mean, sd, exact_mean, exact_sd)


@pytest.mark.slow
def test_index_resampling_surface_is_rough_along_phi(observations):
    # Canary: the same model with stop_gradient(systematic()) under a fixed key (as NUTS sees
    # it) is piecewise constant in phi with jumps; the diffusion surface is as smooth as the
    # exact one. A fine grid: neighbouring exact values differ by well under 0.01.
    raw, observations = observations, jnp.asarray(observations)
    phis = jnp.linspace(0.79, 0.81, 81)

    def surface(resampler):
        def log_likelihood(phi):
            model = ndr.linear_gaussian(lg_params(phi, TRUE["log_q"], TRUE["log_r"]))
            return ndr.particle_filter(
                jax.random.PRNGKey(0),
                model,
                observations,
                num_particles=SURFACE_PARTICLES,
                resampler=resampler,
            ).log_likelihood

        return np.asarray(jax.jit(jax.vmap(log_likelihood))(phis))

    # The oracle in float64, like every exact value in this file (dynamax, through TFP's JAX
    # backend, also fails in float32 once it has run in float64 in the same process).
    with jax.enable_x64(True):
        exact = np.asarray(
            jax.vmap(
                lambda phi: ndr.kalman_log_likelihood(
                    lg_params(phi, TRUE["log_q"], TRUE["log_r"]), jnp.asarray(raw, jnp.float64)
                )
            )(jnp.asarray(phis, jnp.float64))
        )
    roughness = {
        name: float(np.median(np.abs(np.diff(values))))
        for name, values in [
            ("exact", exact),
            ("diffusion", surface(resampling.diffusion(num_steps=4))),
            ("stop_gradient", surface(resampling.stop_gradient(resampling.systematic()))),
        ]
    }
    assert roughness["diffusion"] < 3 * roughness["exact"], roughness
    assert roughness["stop_gradient"] > 10 * roughness["exact"], roughness
    assert roughness["stop_gradient"] > 10 * roughness["diffusion"], roughness


def test_particle_factor_passes_dtype_to_the_filter(observations):
    key = jax.random.PRNGKey(3)
    params = {"phi": 0.7, "log_q": -0.5, "log_r": -0.2}

    def model(dtype):
        ndr.particle_factor(
            "y",
            ndr.linear_gaussian(lg_params(*priors())),
            observations,
            num_particles=16,
            key=key,
            dtype=dtype,
        )

    with jax.enable_x64(True):
        # One compiled program: run op by op, the three filters cost far more.
        @jax.jit
        def factor_and_filters():
            trace = handlers.trace(handlers.substitute(model, data=params)).get_trace(jnp.float32)
            direct = ndr.linear_gaussian(lg_params(*(jnp.asarray(params[n]) for n in NAMES)))
            expected = ndr.particle_filter(
                key, direct, observations, num_particles=16, dtype=jnp.float32
            )
            double = ndr.particle_filter(key, direct, observations, num_particles=16)
            return (
                trace["y"]["fn"].log_factor,
                expected.log_likelihood_increments,
                double.log_likelihood_increments,
            )

        factor, expected, double = factor_and_filters()
    np.testing.assert_allclose(factor, expected, rtol=1e-12)
    # The float32 states really are rounded: not bit-equal to the float64 run.
    assert not np.array_equal(np.asarray(factor), np.asarray(double))
