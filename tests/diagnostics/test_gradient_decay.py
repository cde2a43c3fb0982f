"""gradient_decay: same values, derivatives through the resampler multiplied by the factor."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from numpyro_diffres import resampling

PARTICLES = jnp.linspace(-1.0, 2.0, 8)[:, None]
LOG_WEIGHTS = jnp.linspace(0.0, -1.0, 8)


def _sum_of_outputs(resampler, scale):
    particles, log_weights = resampler(
        jax.random.PRNGKey(0), scale * LOG_WEIGHTS, scale * PARTICLES
    )
    return jnp.sum(particles**2) + jnp.sum(log_weights * jnp.arange(8))


@pytest.mark.parametrize("factor", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    "base", [resampling.diffusion(num_steps=2), resampling.soft(0.5)], ids=["diffusion", "soft"]
)
def test_values_kept_and_derivative_scaled(base, factor):
    decayed = resampling.gradient_decay(base, factor)
    np.testing.assert_array_equal(_sum_of_outputs(decayed, 1.0), _sum_of_outputs(base, 1.0))
    plain = jax.grad(lambda s: _sum_of_outputs(base, s))(1.0)
    damped = jax.jit(jax.grad(lambda s: _sum_of_outputs(decayed, s)))(1.0)
    assert abs(plain) > 1e-3
    np.testing.assert_allclose(damped, factor * plain, rtol=1e-5, atol=1e-6)


def test_filter_value_unchanged_and_history_gradient_removed():
    # x_t = x_{t-1} + N(0, 1) observed without memory of theta except through x_0's mean:
    # with factor 0 the initial mean cannot reach later increments, only the first one.
    def model(mean):
        return ndr.StateSpaceModel(
            dist.Normal(mean, 1.0),
            lambda x, t: dist.Normal(x, 1.0),
            lambda x, t: dist.Normal(x, 1.0),
        )

    y = jnp.array([0.5, 1.0, 1.5, 1.0])

    def increments(mean, resampler):
        return ndr.particle_filter(
            jax.random.PRNGKey(2), model(mean), y, num_particles=16, resampler=resampler
        ).log_likelihood_increments

    base = resampling.diffusion(num_steps=2)
    cut = resampling.gradient_decay(base, 0.0)
    np.testing.assert_array_equal(increments(0.3, cut), increments(0.3, base))
    jacobian = jax.jacobian(increments)(0.3, cut)
    assert jacobian[0] != 0.0
    np.testing.assert_array_equal(jacobian[1:], 0.0)
    assert np.all(jax.jacobian(increments)(0.3, base)[1:] != 0.0)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((None, 0.5), TypeError, "needs a resampler"),
        ((resampling.diffusion(), "0.5"), TypeError, "factor must be a number"),
        ((resampling.diffusion(), True), TypeError, "factor must be a number"),
        ((resampling.diffusion(), 1.5), ValueError, r"factor must lie in \[0, 1\]"),
        ((resampling.diffusion(), -0.1), ValueError, r"factor must lie in \[0, 1\]"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        resampling.gradient_decay(*args)
