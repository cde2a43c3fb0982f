"""Every resampler says what it is (`moves_particles`, `has_ancestors`); wrappers pass it on."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_diffres import resampling

# name -> (factory, moves_particles, has_ancestors)
FACTORIES = {
    "diffusion": (resampling.diffusion, True, False),
    "optimal_transport": (resampling.optimal_transport, True, False),
    "gumbel_softmax": (resampling.gumbel_softmax, True, False),
    "multinomial": (resampling.multinomial, False, True),
    "systematic": (resampling.systematic, False, True),
    "stratified": (resampling.stratified, False, True),
    "stop_gradient": (resampling.stop_gradient, False, True),
    "soft": (resampling.soft, False, True),
}

WRAPPERS = {
    "adaptive": lambda base: resampling.adaptive(base, 0.5),
    "adaptive_never": lambda base: resampling.adaptive(base, 0.0),
    "gradient_decay": lambda base: resampling.gradient_decay(base, 0.5),
    "gradient_decay_identity": lambda base: resampling.gradient_decay(base, 1.0),
}

# No wrapper, one, and each ordered pair of two.
CHAINS = [()] + [(w,) for w in WRAPPERS] + list(itertools.product(WRAPPERS, repeat=2))


@pytest.mark.parametrize("chain", CHAINS, ids=lambda chain: "+".join(chain) or "bare")
@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_factory_and_wrapper_reports_its_traits(name, chain):
    factory, moves_particles, has_ancestors = FACTORIES[name]
    resampler = factory()
    for wrapper in chain:
        resampler = WRAPPERS[wrapper](resampler)
    assert resampler.moves_particles is moves_particles
    assert resampler.has_ancestors is has_ancestors
    assert not (resampler.moves_particles and resampler.has_ancestors)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_the_traits_describe_what_the_resampler_does(name):
    """An index resampler's outputs are input particles; a moving one's are new points."""
    factory, moves_particles, has_ancestors = FACTORIES[name]
    n = 16
    particles = jnp.linspace(-2.0, 2.0, n)[:, None]
    log_weights = -0.5 * jnp.linspace(-2.0, 2.0, n) ** 2
    resampled, _ = factory()(jax.random.PRNGKey(0), log_weights, particles)
    is_copy = np.any(np.asarray(resampled)[:, None, 0] == np.asarray(particles)[None, :, 0], axis=1)
    assert bool(np.all(is_copy)) is has_ancestors
    assert bool(not np.any(is_copy)) is moves_particles


def test_a_wrapped_plain_function_has_no_traits_to_report():
    """A user's plain function declares nothing, and a wrapper does not invent traits for it."""

    def plain(key, log_weights, particles):
        return particles, log_weights

    wrapped = resampling.gradient_decay(resampling.adaptive(plain, 0.5), 0.5)
    with pytest.raises(AttributeError):
        _ = wrapped.moves_particles
