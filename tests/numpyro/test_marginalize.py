"""`marginalize`: a NumPyro scan program's latent states integrated out by the particle filter."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpy.testing import assert_allclose
from numpyro.contrib.control_flow import scan
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.infer.util import log_density

import numpyro_diffres as ndr
from benchmarks.models import sv_latent_model
from numpyro_diffres import resampling
from numpyro_diffres.marginalize import marginalize

TRUE = (-1.0, 0.9, 0.4)


def state_space_model(mu, phi, sigma):
    return ndr.StateSpaceModel(
        initial=dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)),
        transition=lambda x, t: dist.Normal(mu + phi * (x - mu), sigma),
        emission=lambda x, t: dist.Normal(0.0, jnp.exp(x / 2.0)),
    )


def x0_before_scan(y, mu, phi, sigma):
    """Stochastic volatility with x_0 (and y_0 from it) before the scan."""
    x0 = numpyro.sample("x0", dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)))
    numpyro.sample("y0", dist.Normal(0.0, jnp.exp(x0 / 2.0)), obs=y[0])

    def body(x, y_t):
        x = numpyro.sample("x", dist.Normal(mu + phi * (x - mu), sigma))
        numpyro.sample("y", dist.Normal(0.0, jnp.exp(x / 2.0)), obs=y_t)
        return x, x

    scan(body, x0, y[1:])


def x0_in_body(y, mu, phi, sigma):
    """The same model with x_0 drawn in the body at t = 0, two latent sites per step, the time
    index as a covariate through xs and a deterministic site."""

    def body(x, inputs):
        t, y_t = inputs
        first = t == 0
        loc = jnp.where(first, mu, mu + phi * (x - mu))
        scale = jnp.where(first, sigma / jnp.sqrt(1.0 - phi**2), sigma)
        # Two independent halves of the innovation: the same law as one Normal(0, 1).
        a = numpyro.sample("a", dist.Normal(0.0, jnp.sqrt(0.5)))
        b = numpyro.sample("b", dist.Normal(0.0, jnp.sqrt(0.5)))
        x = numpyro.deterministic("x", loc + scale * (a + b))
        numpyro.sample("y", dist.Normal(0.0, jnp.exp(x / 2.0)), obs=y_t)
        return x, None

    scan(body, jnp.zeros(()), (jnp.arange(y.shape[0]), y))


def lagged_pytree(y, mu, phi, sigma):
    """x_0 before the scan, a tuple carry (x_t, x_{t-1})."""
    x0 = numpyro.sample("x0", dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)))
    numpyro.sample("y0", dist.Normal(0.0, jnp.exp(x0 / 2.0)), obs=y[0])

    def body(carry, y_t):
        x, previous = carry
        x = numpyro.sample("x", dist.Normal(mu + phi * (x - mu) + 0.1 * previous, sigma))
        numpyro.sample("y", dist.Normal(0.0, jnp.exp(x / 2.0)), obs=y_t)
        return (x, carry[0]), None

    scan(body, (x0, x0), y[1:])


def lagged_array(y, mu, phi, sigma):
    """`lagged_pytree` with the carry as one array."""
    x0 = numpyro.sample("x0", dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)))
    numpyro.sample("y0", dist.Normal(0.0, jnp.exp(x0 / 2.0)), obs=y[0])

    def body(carry, y_t):
        x = numpyro.sample("x", dist.Normal(mu + phi * (carry[0] - mu) + 0.1 * carry[1], sigma))
        numpyro.sample("y", dist.Normal(0.0, jnp.exp(x / 2.0)), obs=y_t)
        return jnp.stack([x, carry[0]]), None

    scan(body, jnp.stack([x0, x0]), y[1:])


def handler_log_likelihood(model, key, y, theta, num_particles):
    return log_density(
        marginalize(model, num_particles=num_particles, key=key), (y, *theta), {}, {}
    )[0]


def filter_log_likelihood(key, y, theta, num_particles):
    return ndr.particle_filter(
        key, state_space_model(*theta), y, num_particles=num_particles
    ).log_likelihood


@pytest.fixture(scope="module")
def returns():
    _, y = ndr.simulate(jax.random.PRNGKey(1), state_space_model(*TRUE), 12)
    return y


def _same_key_values(y, theta, key):
    """The handler's and the particle filter's value, gradient and per-time terms."""
    handler = jax.value_and_grad(lambda t: handler_log_likelihood(x0_before_scan, key, y, t, 16))(
        theta
    )
    direct = jax.value_and_grad(lambda t: filter_log_likelihood(key, y, t, 16))(theta)
    terms = numpyro.infer.log_likelihood(
        marginalize(x0_before_scan, num_particles=16, key=key), {}, y, *theta, batch_ndims=0
    )["y"]
    increments = ndr.particle_filter(
        key, state_space_model(*theta), y, num_particles=16
    ).log_likelihood_increments
    return handler, direct, terms, increments


same_key_values = jax.jit(_same_key_values)


@pytest.mark.parametrize("missing", [False, True])
def test_same_key_gives_the_particle_filter_to_rounding(returns, missing):
    with jax.enable_x64(True):
        y = jnp.asarray(returns, jnp.float64)
        if missing:
            y = y.at[4].set(jnp.nan)
        theta = jnp.asarray(TRUE, jnp.float64)
        (value, gradient), (expected, expected_gradient), terms, increments = same_key_values(
            y, theta, jax.random.PRNGKey(5)
        )
        assert_allclose(value, expected, rtol=1e-10)
        assert_allclose(gradient, expected_gradient, rtol=1e-8, atol=1e-10)
        # The per-time terms reach numpyro.infer.log_likelihood (and so ArviZ), shape (T,).
        assert terms.shape == (y.shape[0],)
        assert_allclose(terms, increments, rtol=1e-10, atol=1e-12)
        if missing:
            assert terms[4] == 0.0


def test_pytree_carry_equals_the_flat_carry(returns):
    with jax.enable_x64(True):
        y = jnp.asarray(returns, jnp.float64)
        key = jax.random.PRNGKey(2)

        @jax.jit
        def both(theta):
            return [
                jax.value_and_grad(lambda t, m=model: handler_log_likelihood(m, key, y, t, 8))(
                    theta
                )
                for model in (lagged_pytree, lagged_array)
            ]

        values = both(jnp.asarray(TRUE, jnp.float64))
        assert np.isfinite(values[0][0])
        assert_allclose(values[0][0], values[1][0], rtol=1e-12)
        assert_allclose(values[0][1], values[1][1], rtol=1e-10)


def test_first_step_in_the_body_agrees_within_monte_carlo_error(returns):
    """x_0 in the body, two latent sites, covariates: its estimates over keys against the
    particle filter's, mean and d/d mu, within 4 standard errors of the difference."""
    num_keys, num_particles = 48, 16
    keys = jax.random.split(jax.random.PRNGKey(11), num_keys)
    theta = jnp.asarray(TRUE)

    def both(key):
        handler = jax.value_and_grad(
            lambda t: handler_log_likelihood(x0_in_body, key, returns, t, num_particles)
        )(theta)
        direct = jax.value_and_grad(
            lambda t: filter_log_likelihood(key, returns, t, num_particles)
        )(theta)
        return handler[0], handler[1][0], direct[0], direct[1][0]

    handler, handler_slope, direct, direct_slope = jax.jit(jax.vmap(both))(keys)
    for a, b in ((handler, direct), (handler_slope, direct_slope)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        standard_error = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / num_keys)
        assert abs(a.mean() - b.mean()) < 4 * standard_error, (a.mean(), b.mean())
        # Different noise: the two are not the same estimator run twice.
        assert not np.allclose(a, b)


def _no_scan(y):
    mu = numpyro.sample("mu", dist.Normal())
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _no_latent(y):
    mu = numpyro.sample("mu", dist.Normal())

    def body(carry, y_t):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y_t)
        return carry, None

    scan(body, 0.0, y)


def _discrete(y):
    def body(state, y_t):
        state = numpyro.sample("s", dist.Bernoulli(0.5)).astype(jnp.float32)
        numpyro.sample("y", dist.Normal(state, 1.0), obs=y_t)
        return state, None

    scan(body, jnp.zeros(()), y)


def _shape_changes(y):
    x0 = numpyro.sample("x0", dist.Normal(0.0, 1.0))

    def body(x, y_t):
        x = numpyro.sample("x", dist.Normal(jnp.full((2,), x.sum()), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(x.sum(), 1.0), obs=y_t)
        return x, None

    scan(body, x0, y[1:])


def _observed_after(y):
    x0 = numpyro.sample("x0", dist.Normal(0.0, 1.0))

    def body(x, y_t):
        x = numpyro.sample("x", dist.Normal(x, 1.0))
        numpyro.sample("y", dist.Normal(x, 1.0), obs=y_t)
        return x, None

    last, _ = scan(body, x0, y[1:-1])
    numpyro.sample("y_last", dist.Normal(last, 1.0), obs=y[-1])


def _integer_carry(y):
    def body(carry, y_t):
        x, t = carry
        x = numpyro.sample("x", dist.Normal(x, 1.0))
        numpyro.sample("y", dist.Normal(x, 1.0), obs=y_t)
        return (x, t + 1), None

    scan(body, (jnp.zeros(()), jnp.int32(0)), y)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_no_scan, "no numpyro.contrib.control_flow.scan"),
        (_no_latent, "no latent sample sites"),
        (_discrete, "is discrete"),
        (_shape_changes, "changes shape over time"),
        (_observed_after, "'y_last' after the scan depends on the scan's outputs"),
        (_integer_carry, "through xs"),
    ],
)
def test_models_it_cannot_marginalise_raise(model, match):
    y = jnp.ones(6)
    with pytest.raises(ValueError, match=match):
        numpyro.handlers.seed(marginalize(model, num_particles=4), 0)(y)


@pytest.mark.parametrize(
    "resampler",
    [
        resampling.gradient_decay(resampling.diffusion()),
        resampling.gumbel_softmax(),
        resampling.adaptive(resampling.gradient_decay(resampling.optimal_transport()), 0.5),
    ],
    ids=["gradient_decay(diffusion)", "gumbel_softmax", "adaptive(gradient_decay(ot))"],
)
@pytest.mark.parametrize(("model", "match"), [(_discrete, "is discrete"), (_integer_carry, "xs")])
def test_every_resampler_that_moves_particles_refuses_discrete_states(resampler, model, match):
    """Wrapped or not, a resampler that moves particles would move integers off their values."""
    y = jnp.ones(6)
    with pytest.raises(ValueError, match=match):
        numpyro.handlers.seed(marginalize(model, num_particles=4, resampler=resampler), 0)(y)


def test_a_resampler_that_does_not_say_what_it_is_is_refused():
    def plain(key, log_weights, particles):
        return particles, log_weights

    with pytest.raises(TypeError, match="moves_particles"):
        marginalize(x0_before_scan, num_particles=4, resampler=plain)


def test_discrete_states_run_with_an_index_resampler():
    y = jnp.ones(6)
    traced = numpyro.handlers.trace(
        numpyro.handlers.seed(
            marginalize(_discrete, num_particles=4, resampler=resampling.systematic()), 0
        )
    ).get_trace(y)
    assert np.isfinite(traced["y"]["fn"].log_factor).all()


def test_a_with_block_cannot_marginalise_x0_before_the_scan(returns):
    def wrapped(y):
        with marginalize(num_particles=4):
            x0_before_scan(y, *TRUE)

    with pytest.raises(ValueError, match=r"wrap the model, marginalize\(model"):
        numpyro.handlers.seed(wrapped, 0)(returns)


def test_a_with_block_marginalises_x0_in_the_body(returns):
    key = jax.random.PRNGKey(3)

    def wrapped(y):
        with marginalize(num_particles=8, key=key):
            x0_in_body(y, *TRUE)

    def as_call(y):
        marginalize(x0_in_body, num_particles=8, key=key)(y, *TRUE)

    values = jax.jit(
        lambda y: [log_density(model, (y,), {}, {})[0] for model in (wrapped, as_call)]
    )(returns)
    assert np.isfinite(values[0])
    assert_allclose(values[0], values[1], rtol=1e-6)


def _unobserved_body(y, mu, phi, sigma):
    """Stochastic volatility whose observed values come from a condition handler."""

    def body(x, t):
        x = numpyro.sample("x", dist.Normal(jnp.where(t == 0, mu, mu + phi * (x - mu)), sigma))
        numpyro.sample("y", dist.Normal(0.0, jnp.exp(x / 2.0)))
        return x, None

    scan(body, jnp.zeros(()), jnp.arange(y.shape[0]))


def test_condition_fn_observes_body_sites_as_condition_data_does(returns):
    key = jax.random.PRNGKey(4)

    def by_data(y):
        conditioned = numpyro.handlers.condition(_unobserved_body, data={"y": y})
        return marginalize(conditioned, num_particles=8, key=key, name="ll")(y, *TRUE)

    def by_function(y):
        conditioned = numpyro.handlers.condition(
            _unobserved_body, condition_fn=lambda site: y if site["name"] == "y" else None
        )
        return marginalize(conditioned, num_particles=8, key=key, name="ll")(y, *TRUE)

    values = [log_density(model, (returns,), {}, {})[0] for model in (by_data, by_function)]
    assert np.isfinite(values[0])
    assert np.array_equal(values[0], values[1])


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_substituting_a_body_site_is_refused(returns, inside):
    """A substituted latent path is what marginalize integrates out: it cannot be honoured."""
    path = {"x": jnp.zeros(returns.shape[0] - 1)}
    if inside:
        model = marginalize(numpyro.handlers.substitute(x0_before_scan, data=path), num_particles=4)
    else:
        model = numpyro.handlers.substitute(marginalize(x0_before_scan, num_particles=4), path)
    with pytest.raises(ValueError, match=r"substitute.*'x'"):
        numpyro.handlers.seed(model, 0)(returns, *TRUE)


def test_substituting_static_sites_is_honoured(returns):
    key = jax.random.PRNGKey(4)

    def statics(y):
        mu = numpyro.sample("mu", dist.Normal())
        x0_before_scan(y, mu, *TRUE[1:])

    fixed = numpyro.handlers.substitute(
        marginalize(statics, num_particles=8, key=key), data={"mu": TRUE[0]}
    )
    value = log_density(fixed, (returns,), {}, {})[0]
    direct = log_density(
        marginalize(x0_before_scan, num_particles=8, key=key), (returns, *TRUE), {}, {}
    )[0]
    assert_allclose(value - dist.Normal().log_prob(TRUE[0]), direct, rtol=1e-6)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_particles"):
        marginalize(x0_before_scan, num_particles=1)
    with pytest.raises(TypeError, match="resampler"):
        marginalize(x0_before_scan, num_particles=4, resampler="diffusion")
    with pytest.raises(TypeError, match="key"):
        marginalize(x0_before_scan, num_particles=4, key=3)
    with pytest.raises(TypeError, match="initial_sites"):
        marginalize(x0_before_scan, num_particles=4, initial_sites="x0")
    with pytest.raises(TypeError, match="latent_paths"):
        marginalize(x0_before_scan, num_particles=4, latent_paths=1)
    with pytest.raises(ValueError, match="smoothing"):
        marginalize(x0_before_scan, num_particles=4, smoothing="rts")


# ------------------------------------------------------------------ NUTS, both ways


# One model function, fitted both ways (statics, then a non-centred latent path).
stochastic_volatility = sv_latent_model(record_path=True)


@pytest.mark.slow
def test_nuts_over_statics_agrees_with_nuts_over_all_latents(mcse_mean):
    _, returns = ndr.simulate(jax.random.PRNGKey(0), state_space_model(*TRUE), 50)
    latent = MCMC(NUTS(stochastic_volatility), num_warmup=400, num_samples=800, progress_bar=False)
    latent.run(jax.random.PRNGKey(1), returns)
    marginal = MCMC(
        # At N = 64 the fixed-noise surrogate shifted sigma by 0.30 posterior SD here (and by
        # 0.38 at T = 100 in benchmarks/results/versus_latent_nuts.md): a particle bias that
        # shrinks with N, which this test is not meant to measure.
        NUTS(
            marginalize(
                stochastic_volatility,
                num_particles=128,
                resampler=resampling.diffusion(num_steps=4),
            )
        ),
        num_warmup=150,
        num_samples=250,
        progress_bar=False,
    )
    marginal.run(jax.random.PRNGKey(2), returns)
    exact, filtered = latent.get_samples(), marginal.get_samples()
    assert set(filtered) == {"mu", "phi", "sigma"}
    for name in ("mu", "phi", "sigma"):
        sd = float(exact[name].std())
        # The means differ by both chains' Monte Carlo error (the particle chain's 250 draws
        # are worth about 100 for mu: 0.1 posterior SD) plus the surrogate's bias at this N,
        # allowed 0.3 SD. Measured shifts of mu: -0.27 and -0.36 SD under two compiler
        # settings, each with a standard error of 0.11 SD (suite_timing.md).
        error = math.hypot(mcse_mean(exact[name]), mcse_mean(filtered[name]))
        shift = abs(float(filtered[name].mean() - exact[name].mean()))
        assert shift < 0.3 * sd + 3 * error, (name, shift / sd, error / sd)
        assert abs(float(filtered[name].std()) / sd - 1.0) < 0.3, name
    # The latent sites, site by site: one smoothed path per posterior draw of the statics.
    paths = Predictive(
        marginalize(
            stochastic_volatility,
            num_particles=128,
            resampler=resampling.diffusion(num_steps=4),
            latent_paths=True,
        ),
        filtered,
    )(jax.random.PRNGKey(3), returns)
    for name in ("z0", "z", "x"):
        assert paths[name].shape[1:] == exact[name].shape[1:], name
        sd = np.asarray(exact[name].std(0))
        shift = np.abs(np.asarray(paths[name].mean(0) - exact[name].mean(0))) / sd
        assert np.max(shift) < 0.5, (name, np.max(shift))
        assert abs(np.median(np.asarray(paths[name].std(0)) / sd) - 1.0) < 0.3, name
