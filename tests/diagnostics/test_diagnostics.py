"""The roughness diagnostic: rough on the nonlinear growth model, smooth on AR(1) plus noise."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from benchmarks import models
from numpyro_diffres import diagnostics, resampling

NUM_STEPS = 30
SETTINGS = {"num_particles": 64, "num_points": 10, "num_keys": 8}


def growth(params):
    return models.growth(params["sv"])


def ar1(params):
    return models.ar1(params["phi"], params["sigma"], 0.5, initial_scale=1.0)


@pytest.fixture(scope="module")
def growth_data():
    return ndr.simulate(jax.random.PRNGKey(0), growth({"sv": jnp.sqrt(10.0)}), NUM_STEPS)[1]


@pytest.fixture(scope="module")
def ar1_data():
    return ndr.simulate(jax.random.PRNGKey(3), ar1({"phi": 0.8, "sigma": 0.5}), NUM_STEPS)[1]


@pytest.fixture(scope="module")
def growth_default(growth_data):
    return diagnostics.filter_surface(
        jax.random.PRNGKey(11), growth, growth_data, {"sv": 3.16}, **SETTINGS
    )


@pytest.fixture(scope="module")
def ar1_default(ar1_data):
    return diagnostics.filter_surface(
        jax.random.PRNGKey(11), ar1, ar1_data, {"phi": 0.8, "sigma": 0.5}, **SETTINGS
    )


def test_growth_model_default_is_rough(growth_default):
    report = growth_default
    assert report.verdict == "rough"
    assert report.names == ("sv",)
    # The fixed-key gradient is far from the averaged slope and does not predict the values.
    assert report.gradient_ratio[0] > diagnostics.GRADIENT_RATIO_LIMIT
    assert report.mismatch[0] > diagnostics.MISMATCH_LIMIT
    assert "gradient_decay" in report.advice
    assert "ROUGH" in str(report)


def test_ar1_default_is_smooth(ar1_default):
    report = ar1_default
    assert report.verdict == "smooth", str(report)
    assert report.names == ("phi", "sigma")
    assert report.offsets.shape == report.gradient.shape == (2, SETTINGS["num_points"])
    # Smooth: the gradient predicts each value change to well under one log-likelihood unit.
    assert np.all(report.mismatch < 0.1)
    assert np.all(report.sign_change_fraction == 0.0)
    # The averaged slope agrees with the fixed-key gradient at the centre up to key noise
    # (four spreads: a 4-sigma bound for one key).
    centre = np.mean(
        report.gradient[:, SETTINGS["num_points"] // 2 - 1 : SETTINGS["num_points"] // 2 + 1],
        axis=1,
    )
    assert np.all(np.abs(centre - report.averaged_slope) < 4 * report.slope_spread)
    assert "SMOOTH" in report.summary()


def test_gradient_decay_makes_growth_model_smooth(growth_data):
    report = diagnostics.filter_surface(
        jax.random.PRNGKey(11),
        growth,
        growth_data,
        {"sv": 3.16},
        resampler=resampling.gradient_decay(resampling.diffusion(), 0.0),
        **SETTINGS,
    )
    assert report.verdict == "smooth", str(report)


def test_direction_and_generic_log_likelihood(ar1_data):
    def log_likelihood(key, params):
        return ndr.particle_filter(key, ar1(params), ar1_data, num_particles=16).log_likelihood

    report = diagnostics.surface(
        jax.random.PRNGKey(1),
        log_likelihood,
        {"phi": 0.8, "sigma": 0.5},
        direction={"phi": 1.0, "sigma": 1.0},
        radius=0.02,
        num_points=5,
        num_keys=2,
    )
    assert report.names == ("direction",)
    np.testing.assert_allclose(report.offsets[0, [0, -1]], [-0.02, 0.02], rtol=1e-6)


def _constant(key, params):
    return jnp.sum(params["a"]) * 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"log_likelihood_fn": 3.0}, TypeError, "log_likelihood_fn must be callable"),
        ({"num_points": 3}, ValueError, "num_points must be >= 5"),
        ({"num_points": 5.0}, TypeError, "num_points must be an int"),
        ({"num_keys": 1}, ValueError, "num_keys must be >= 2"),
        ({"radius": -1.0}, ValueError, "radius must be positive"),
        ({"params": {}}, ValueError, "params is empty"),
        ({"params": {"a": jnp.arange(2)}}, TypeError, "floating-point"),
        ({"direction": {"b": 1.0}}, ValueError, "structure of params"),
        ({"direction": {"a": jnp.zeros(2)}}, ValueError, "not all zero"),
        ({"direction": {"a": jnp.ones(3)}}, ValueError, "direction has 3 entries"),
        (
            {"log_likelihood_fn": lambda key, params: params["a"]},
            ValueError,
            "must return a scalar",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    arguments = {"log_likelihood_fn": _constant, "params": {"a": jnp.ones(2)}, **kwargs}
    with pytest.raises(error, match=match):
        diagnostics.surface(
            jax.random.PRNGKey(0),
            arguments.pop("log_likelihood_fn"),
            arguments.pop("params"),
            **arguments,
        )


def test_filter_surface_bad_model_fn(ar1_data):
    with pytest.raises(TypeError, match="model_fn must be callable"):
        diagnostics.filter_surface(jax.random.PRNGKey(0), None, ar1_data, 0.8, num_particles=8)
    with pytest.raises(TypeError, match="must return a StateSpaceModel"):
        diagnostics.filter_surface(
            jax.random.PRNGKey(0), lambda p: p, ar1_data, 0.8, num_particles=8
        )


# --- choosing the number of particles ---------------------------------------------------------


def test_choose_num_particles_meets_the_target_and_grows_with_it(ar1_data):
    params = {"phi": 0.8, "sigma": 0.5}
    key = jax.random.PRNGKey(5)
    loose = diagnostics.choose_num_particles(
        key, ar1, ar1_data, params, target_sd=2.0, initial=32, num_keys=8
    )
    strict = diagnostics.choose_num_particles(
        key, ar1, ar1_data, params, target_sd=1.0, initial=32, num_keys=8
    )
    for choice, target in ((loose, 2.0), (strict, 1.0)):
        assert choice.reached and choice.sd <= target
        assert choice.tried[-1] == (choice.num_particles, choice.sd)
        # Every N tried before the last missed the target.
        assert all(sd > target for _, sd in choice.tried[:-1])
    # The strict target is missed where the loose one is met, so a larger N is chosen for it.
    assert strict.num_particles > loose.num_particles
    # The SD shrinks with N.
    assert strict.tried[-1][1] < strict.tried[0][1]


def test_choose_num_particles_stops_at_the_cap(ar1_data):
    choice = diagnostics.choose_num_particles(
        jax.random.PRNGKey(5),
        ar1,
        ar1_data,
        {"phi": 0.8, "sigma": 0.5},
        target_sd=1e-3,
        initial=8,
        max_particles=16,
        num_keys=4,
    )
    assert not choice.reached and choice.num_particles == 16
    assert [n for n, _ in choice.tried] == [8, 16]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_sd": 0.0}, ValueError, "target_sd"),
        ({"initial": 1}, ValueError, "initial"),
        ({"initial": 64, "max_particles": 32}, ValueError, "max_particles"),
        ({"num_keys": 2.0}, TypeError, "num_keys"),
    ],
)
def test_choose_num_particles_checks_its_arguments(ar1_data, kwargs, error, match):
    with pytest.raises(error, match=match):
        diagnostics.choose_num_particles(
            jax.random.PRNGKey(0), ar1, ar1_data, {"phi": 0.8, "sigma": 0.5}, **kwargs
        )


def test_choose_num_particles_refuses_an_infinite_log_likelihood(ar1_data):
    with pytest.raises(ValueError, match="not finite"):
        diagnostics.choose_num_particles(
            jax.random.PRNGKey(0),
            ar1,
            ar1_data.at[3].set(jnp.inf),
            {"phi": 0.8, "sigma": 0.5},
            initial=8,
            num_keys=4,
        )


def ar1_program(y):
    """`ar1` written as a NumPyro program, for `marginalize`."""
    import numpyro
    from numpyro.contrib.control_flow import scan

    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    x0 = numpyro.sample("x0", dist.Normal(0.0, 1.0))
    numpyro.sample("y0", dist.Normal(x0, 0.5), obs=y[0])

    def step(x, y_t):
        x = numpyro.sample("x", dist.Normal(phi * x, sigma))
        numpyro.sample("y", dist.Normal(x, 0.5), obs=y_t)
        return x, None

    scan(step, x0, y[1:])


def test_choose_marginal_num_particles_follows_the_rule_on_the_program(ar1_data):
    params = {"phi": 0.8, "sigma": 0.5}
    key = jax.random.PRNGKey(5)
    choice = diagnostics.choose_marginal_num_particles(
        key, ar1_program, params, model_args=(ar1_data,), target_sd=1.0, initial=64, num_keys=16
    )
    assert choice.reached and choice.sd <= 1.0
    assert all(sd > 1.0 for _, sd in choice.tried[:-1]) and len(choice.tried) >= 2
    assert choice.tried[-1][1] < choice.tried[0][1]
    # It measures the marginal log-likelihood's spread: at the same N it agrees with the
    # filter route on the same model within the SDs' own sampling error (16 keys each: about
    # 18% relative error each; a factor of 2 is about 2.7 standard errors of their ratio).
    direct = diagnostics.choose_num_particles(
        key, ar1, ar1_data, params, target_sd=1e-9, initial=64, max_particles=64, num_keys=16
    )
    assert 0.5 < choice.tried[0][1] / direct.sd < 2.0


def test_choose_marginal_num_particles_checks_its_arguments(ar1_data):
    with pytest.raises(TypeError, match="params must be a dict"):
        diagnostics.choose_marginal_num_particles(
            jax.random.PRNGKey(0), ar1_program, (0.8, 0.5), model_args=(ar1_data,)
        )
    with pytest.raises(TypeError, match="model must be a callable"):
        diagnostics.choose_marginal_num_particles(jax.random.PRNGKey(0), None, {"phi": 0.8})
    # sigma would be drawn from its prior for every key.
    with pytest.raises(ValueError, match=r"no value for the static sites \['sigma'\]"):
        diagnostics.choose_marginal_num_particles(
            jax.random.PRNGKey(0), ar1_program, {"phi": 0.8}, model_args=(ar1_data,), initial=8
        )
    with pytest.raises(ValueError, match="target_sd"):
        diagnostics.choose_marginal_num_particles(
            jax.random.PRNGKey(0),
            ar1_program,
            {"phi": 0.8, "sigma": 0.5},
            model_args=(ar1_data,),
            target_sd=0.0,
        )
