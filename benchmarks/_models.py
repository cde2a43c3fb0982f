"""Models shared by several benchmark scripts (one definition, so their data agree)."""

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import numpyro_diffres as ndr

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
