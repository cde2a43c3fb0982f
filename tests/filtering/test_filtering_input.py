"""Bad input and hostile parameters for the model and the filter (default precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from benchmarks import models
from numpyro_diffres import resampling


def ar1(phi=0.8, q=0.5, r=0.5):
    return models.ar1(phi, q, r, initial_scale=1.0)


OBSERVATIONS = jnp.sin(jnp.arange(12.0) / 3.0)
KEY = jax.random.PRNGKey(0)


def run(model, observations=OBSERVATIONS, **kwargs):
    kwargs.setdefault("num_particles", 16)
    return ndr.particle_filter(KEY, model, observations, **kwargs)


def test_result_shapes():
    result = run(ar1())
    assert result.log_likelihood.shape == ()
    for field in (result.log_likelihood_increments, result.ess):
        assert field.shape == (12,)
    assert result.filtered_mean.shape == (12,) and result.filtered_variance.shape == (12,)
    assert jnp.isfinite(result.log_likelihood)


@pytest.mark.parametrize("num_particles", [1, 0, -3])
def test_too_few_particles(num_particles):
    with pytest.raises(ValueError, match="num_particles"):
        run(ar1(), num_particles=num_particles)


@pytest.mark.parametrize("num_particles", [16.0, "16", True, None])
def test_non_integer_particles(num_particles):
    with pytest.raises(TypeError, match="num_particles"):
        run(ar1(), num_particles=num_particles)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_bad_ess_threshold(threshold):
    with pytest.raises(ValueError, match="ess_threshold"):
        run(ar1(), ess_threshold=threshold)


def test_resampler_must_be_callable():
    with pytest.raises(TypeError, match="resampler"):
        run(ar1(), resampler="diffusion")


def test_observation_shape_must_fit_the_emission():
    with pytest.raises(ValueError, match=r"observations have per-time shape \(2,\)"):
        run(ar1(), observations=jnp.zeros((12, 2)))
    with pytest.raises(ValueError, match="observations must have shape"):
        run(ar1(), observations=jnp.zeros(()))


def test_state_shapes_must_agree():
    model = ndr.StateSpaceModel(
        dist.Normal(jnp.zeros(2), 1.0).to_event(1),
        lambda x, t: dist.Normal(x[0], 1.0),
        lambda x, t: dist.Normal(x.sum(), 1.0),
    )
    with pytest.raises(ValueError, match="transition"):
        run(model)


def test_batched_distribution_is_refused_with_a_fix():
    model = ndr.StateSpaceModel(
        dist.Normal(jnp.zeros(2), 1.0),
        lambda x, t: dist.Normal(x, 1.0).to_event(1),
        lambda x, t: dist.Normal(x.sum(), 1.0),
    )
    with pytest.raises(ValueError, match=r"to_event\(1\)"):
        run(model)


def test_model_arguments_are_checked():
    with pytest.raises(TypeError, match="initial"):
        ndr.StateSpaceModel(0.0, lambda x, t: x, lambda x, t: x)
    with pytest.raises(TypeError, match="transition"):
        ndr.StateSpaceModel(dist.Normal(), 1.0, lambda x, t: x)
    with pytest.raises(TypeError, match="numpyro Distribution"):
        run(ndr.StateSpaceModel(dist.Normal(), lambda x, t: x, lambda x, t: dist.Normal(x)))


@pytest.mark.parametrize(
    "num_steps, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_simulate_num_steps(num_steps, error):
    with pytest.raises(error, match="num_steps"):
        ndr.simulate(KEY, ar1(), num_steps)


def poisson_states():
    return ndr.StateSpaceModel(
        dist.Poisson(3.0),
        lambda x, t: dist.Poisson(x + 1.0),
        lambda x, t: dist.Normal(x, 1.0),
    )


def test_non_reparameterisable_transition_warns():
    model = poisson_states()
    with pytest.warns(UserWarning, match="no reparameterised sampler"):
        result = run(model, resampler=resampling.systematic())
    assert jnp.isfinite(result.log_likelihood)


def invalid_scale_log_likelihood(scale, where):
    q, r = (scale, 0.5) if where == "transition" else (0.5, scale)
    return run(ar1(q=q, r=r)).log_likelihood


@pytest.mark.parametrize("where", ["transition", "emission"])
@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_invalid_parameters_give_minus_infinity_and_zero_gradient(where, scale):
    # Under jit (as under NUTS) the parameter is traced, so NumPyro cannot raise: the filter
    # gives the point zero likelihood and a finite gradient, which NUTS rejects.
    value, gradient = jax.jit(jax.value_and_grad(invalid_scale_log_likelihood), static_argnums=1)(
        scale, where
    )
    assert value == -jnp.inf
    assert gradient == 0.0


def test_invalid_concrete_parameters_raise_numpyro_validation_error():
    # NumPyro validates concrete arguments by default; its own message reaches the user.
    with pytest.raises(ValueError, match="invalid scale parameter"):
        invalid_scale_log_likelihood(-0.5, "emission")


def test_all_particles_impossible_gives_minus_infinity():
    # Uniform emission far from every particle: every weight is zero at t = 5.
    def emission(x, t):
        return dist.Uniform(x - 1.0, x + 1.0)

    observations = OBSERVATIONS.at[5].set(100.0)
    model = ndr.StateSpaceModel(dist.Normal(0.0, 1.0), lambda x, t: dist.Normal(x, 0.1), emission)

    def log_likelihood(loc):
        shifted = ndr.StateSpaceModel(dist.Normal(loc, 1.0), model.transition, emission)
        return ndr.particle_filter(KEY, shifted, observations, num_particles=16).log_likelihood

    value, gradient = jax.value_and_grad(log_likelihood)(0.0)
    assert value == -jnp.inf and jnp.isfinite(gradient)
    result = run(model, observations=observations)
    assert result.log_likelihood_increments[5] == -jnp.inf
    assert jnp.all(jnp.isfinite(result.filtered_mean))


def test_missing_observation_contributes_nothing():
    observations = OBSERVATIONS.at[3].set(jnp.nan)
    result = run(ar1(), observations=observations)
    assert result.log_likelihood_increments[3] == 0.0
    assert jnp.isfinite(result.log_likelihood)
    gradient = jax.grad(lambda r: run(ar1(r=r), observations=observations).log_likelihood)(0.5)
    assert jnp.isfinite(gradient)


def test_jit_vmap_and_grad():
    def log_likelihood(phi, key):
        return ndr.particle_filter(key, ar1(phi=phi), OBSERVATIONS, num_particles=16).log_likelihood

    keys = jax.random.split(KEY, 3)
    batched = jax.jit(jax.vmap(log_likelihood, in_axes=(None, 0)))(0.8, keys)
    looped = np.array([log_likelihood(0.8, k) for k in keys])
    # XLA may fuse the batched program differently: agreement to float rounding only.
    np.testing.assert_allclose(batched, looped, rtol=1e-4)
    assert len(set(np.asarray(batched).tolist())) == 3
    gradient = jax.jit(jax.grad(log_likelihood))(0.8, KEY)
    assert jnp.isfinite(gradient) and gradient != 0.0


def test_multivariate_state_and_observation():
    model = ndr.StateSpaceModel(
        dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3)),
        lambda x, t: dist.MultivariateNormal(0.9 * x, 0.2 * jnp.eye(3)),
        lambda x, t: dist.Normal(x[:2], 0.5).to_event(1),
    )
    states, observations = ndr.simulate(KEY, model, 10)
    assert states.shape == (10, 3) and observations.shape == (10, 2)
    result = run(model, observations=observations)
    assert result.filtered_mean.shape == (10, 3)
    assert jnp.isfinite(result.log_likelihood)


@pytest.mark.parametrize("dtype", ["int32", jnp.int32, "banana", 3])
def test_dtype_must_be_floating(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        run(ar1(), dtype=dtype)


def test_float64_dtype_without_x64_is_refused():
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        run(ar1(), dtype=jnp.float64)


def test_dtype_for_discrete_states_is_refused():
    model = poisson_states()
    with pytest.raises(ValueError, match="floating-point states"):
        run(model, resampler=resampling.systematic(), dtype=jnp.float32)


def test_dtype_given_as_a_string_rounds_the_states():
    with jax.enable_x64(True):
        observations = jnp.asarray(OBSERVATIONS, jnp.float64)
        by_name = float(run(ar1(), observations, dtype="float32").log_likelihood)
        by_type = float(run(ar1(), observations, dtype=jnp.float32).log_likelihood)
        double = float(run(ar1(), observations).log_likelihood)
    assert by_name == by_type
    # The states really were rounded to float32: not bit-equal to the float64 filter.
    assert by_name != double and abs(by_name / double - 1) < 1e-5


def test_checkpoint_recomputes_steps_without_changing_the_gradient():
    def value_and_grad(checkpoint):
        def log_likelihood(phi):
            return run(ar1(phi), num_particles=16, checkpoint=checkpoint).log_likelihood

        return jax.value_and_grad(log_likelihood)

    # The default at this size stores the steps; checkpoint=True rematerialises them.
    assert "remat" not in str(jax.make_jaxpr(value_and_grad(None))(0.8))
    assert "remat" in str(jax.make_jaxpr(value_and_grad(True))(0.8))
    stored = jax.jit(value_and_grad(False))(0.8)
    recomputed = jax.jit(value_and_grad(True))(0.8)
    np.testing.assert_allclose(stored, recomputed, rtol=1e-5)


def test_checkpoint_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="checkpoint must be True, False or None"):
        run(ar1(), num_particles=8, checkpoint="yes")
