"""One bad value gets one error type and message from every entry point (numpyro_diffres.checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_diffres as ndr
from numpyro_diffres import resampling

KEY = jax.random.PRNGKey(0)
MODEL = ndr.StateSpaceModel(
    initial=dist.Normal(0.0, 1.0),
    transition=lambda x, t: dist.Normal(0.9 * x, 0.5),
    emission=lambda x, t: dist.Normal(x, 0.3),
)
Y = jnp.zeros(3)

# Each entry point takes one count; the lambdas pass it where that entry point expects it.
COUNT_ENTRY_POINTS = {
    "particle_filter": lambda n: ndr.particle_filter(KEY, MODEL, Y, num_particles=n),
    "simulate": lambda n: ndr.simulate(KEY, MODEL, n),
    "diffusion": lambda n: resampling.diffusion(num_steps=n),
    "optimal_transport": lambda n: resampling.optimal_transport(0.5, max_iterations=n),
}


@pytest.mark.parametrize("entry", list(COUNT_ENTRY_POINTS))
def test_numpy_integers_are_counts(entry):
    COUNT_ENTRY_POINTS[entry](np.int64(4))


@pytest.mark.parametrize("entry", list(COUNT_ENTRY_POINTS))
@pytest.mark.parametrize("value", [4.0, True, "4", np.float32(4.0)])
def test_a_non_integer_count_is_a_type_error_everywhere(entry, value):
    with pytest.raises(TypeError, match=r"must be an int >= \d, got"):
        COUNT_ENTRY_POINTS[entry](value)


@pytest.mark.parametrize("entry", list(COUNT_ENTRY_POINTS))
def test_a_too_small_count_is_a_value_error_everywhere(entry):
    with pytest.raises(ValueError, match=r"must be >= \d, got -3"):
        COUNT_ENTRY_POINTS[entry](-3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ndr.particle_filter(KEY, MODEL, Y, num_particles=4, resampler="diffusion"),
        lambda: resampling.adaptive("diffusion", 0.5),
    ],
)
def test_a_non_callable_resampler_is_one_type_error(call):
    with pytest.raises(TypeError, match=r"resampler must be callable as resampler\(key"):
        call()


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_thresholds_outside_the_unit_interval(threshold):
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        ndr.particle_filter(KEY, MODEL, Y, num_particles=4, ess_threshold=threshold)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        resampling.adaptive(resampling.systematic(), threshold)


def test_adaptive_never_and_always():
    log_weights = jnp.log(jnp.array([0.7, 0.1, 0.1, 0.1]))
    particles = jnp.arange(4.0)
    inner = resampling.systematic()
    assert resampling.adaptive(inner, 1.0) is inner
    kept, kept_log_weights = resampling.adaptive(inner, 0.0)(KEY, log_weights, particles)
    np.testing.assert_array_equal(kept, particles)
    np.testing.assert_array_equal(kept_log_weights, log_weights)
    # ESS = 1 / sum w^2 = 1.92: resampled below a threshold of 0.5 * 4 = 2, kept below 0.25 * 4.
    resampled, _ = resampling.adaptive(inner, 0.5)(KEY, log_weights, particles)
    np.testing.assert_array_equal(resampled, inner(KEY, log_weights, particles)[0])
    assert not np.array_equal(resampled, particles)
    kept, _ = resampling.adaptive(inner, 0.25)(KEY, log_weights, particles)
    np.testing.assert_array_equal(kept, particles)
