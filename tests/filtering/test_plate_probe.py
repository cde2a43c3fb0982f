"""The plate probe: hostile inputs give the same verdict through one series and through a plate.

One series and many run the same core (`batch_shape=()` is the empty batch). Each hostile
case is filtered alone and as S copies under `batch_shape=(S,)`; every copy must be impossible
exactly when the single series is, and the gradient must be finite both ways. A plate path
that drifted from the single-series one (e.g. a density check only one of them makes) fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from numpyro_diffres import resampling

S = 3
T = 6
NUM_PARTICLES = 8
OBSERVATIONS = jnp.array([0.3, 1.2, 0.7, 0.1, 0.9, 0.4])


def model(scale, emission="normal", batch=()):
    """AR(1) whose transition scale is `scale` (shape `batch`, one per series in a plate)."""
    scale = jnp.broadcast_to(scale, batch)
    initial = dist.Normal(jnp.zeros(batch), 1.0)

    def transition(x, t):
        return dist.Normal(0.9 * x, scale)

    def emit(x, t):
        if emission == "exponential":
            return dist.Exponential(jnp.exp(x))
        return dist.Normal(x, 0.5)

    return ndr.StateSpaceModel(initial, transition, emit)


HOSTILE = {
    "finite": (0.7, "normal", OBSERVATIONS),
    "impossible_observation": (0.7, "normal", OBSERVATIONS.at[2].set(jnp.inf)),
    "invalid_parameter": (-0.7, "normal", OBSERVATIONS),
    "nan_parameter": (jnp.nan, "normal", OBSERVATIONS),
    "overflowing_states": (1e308, "normal", OBSERVATIONS),
    "missing_data": (0.7, "normal", OBSERVATIONS.at[1].set(jnp.nan).at[4].set(jnp.nan)),
    "outside_support": (0.7, "exponential", OBSERVATIONS.at[3].set(-1.0)),
}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("resampler", [resampling.systematic, resampling.diffusion])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_one_series_and_plate_agree_on_hostile_inputs(case, resampler):
    scale, emission, observations = HOSTILE[case]
    key = jax.random.PRNGKey(0)

    def alone(scale):
        return ndr.particle_filter(
            key,
            model(scale, emission),
            observations,
            num_particles=NUM_PARTICLES,
            resampler=resampler(),
        ).log_likelihood

    def plate(scale):
        return ndr.particle_filter(
            key,
            model(scale, emission, (S,)),
            jnp.broadcast_to(observations, (S, T)),
            num_particles=NUM_PARTICLES,
            resampler=resampler(),
            batch_shape=(S,),
        ).log_likelihood

    value, gradient = jax.jit(jax.value_and_grad(alone))(jnp.float64(scale))
    values, jacobian = jax.jit(lambda s: (plate(s), jax.jacrev(plate)(s)))(
        jnp.full((S,), scale, jnp.float64)
    )
    assert values.shape == (S,)
    assert not np.isnan(value) and not np.any(np.isnan(values))
    np.testing.assert_array_equal(np.isfinite(values), np.full(S, np.isfinite(value)))
    assert np.isfinite(gradient)
    assert np.all(np.isfinite(jacobian))
    # A series' estimate depends only on its own parameters.
    np.testing.assert_array_equal(jacobian * (1 - np.eye(S)), np.zeros((S, S)))
