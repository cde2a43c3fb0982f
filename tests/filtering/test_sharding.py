"""The particle axis and the series axis sharded over 4 (virtual CPU) devices give the
one-device result (one subprocess for both: the virtual devices need a fresh JAX)."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from jax.sharding import NamedSharding, PartitionSpec

    import numpyro_diffres as ndr

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4, jax.devices()


    def model(theta):
        phi, log_q = theta
        return ndr.StateSpaceModel(
            initial=dist.Normal(0.0, 1.0).expand([2]).to_event(1),
            transition=lambda x, t: dist.Normal(phi * x, jnp.exp(log_q)).to_event(1),
            emission=lambda x, t: dist.Normal(x, 0.5).to_event(1),
        )


    _, observations = ndr.simulate(jax.random.PRNGKey(1), model(jnp.array([0.8, -0.5])), 12)
    sharding = NamedSharding(jax.make_mesh((4,), ("particles",)), PartitionSpec("particles"))
    theta = jnp.array([0.7, -0.3])
    for name, resampler in [
        ("diffusion", ndr.resampling.diffusion()),
        ("stop_gradient", ndr.resampling.stop_gradient(ndr.resampling.systematic())),
    ]:

        def log_likelihood(theta, particle_sharding):
            return ndr.particle_filter(
                jax.random.PRNGKey(0),
                model(theta),
                observations,
                num_particles=32,
                resampler=resampler,
                particle_sharding=particle_sharding,
            ).log_likelihood

        one, one_grad = jax.jit(jax.value_and_grad(lambda t: log_likelihood(t, None)))(theta)
        four, four_grad = jax.jit(jax.value_and_grad(lambda t: log_likelihood(t, sharding)))(
            theta
        )
        # Same arithmetic, different reduction order across shards: agreement to rounding.
        assert abs(float(one - four)) <= 1e-10 * abs(float(one)), (name, one, four)
        assert float(jnp.max(jnp.abs(one_grad - four_grad))) <= 1e-10, (name, one_grad, four_grad)
        assert jnp.all(jnp.isfinite(four_grad)), name
        print(name, "ok", float(one), float(four))

    S = 8


    def series_model(theta):
        # Series-level coefficients (S,) and a shared log noise scale; a particle is (S, 2).
        phi, log_q = theta[:S], theta[S]
        return ndr.StateSpaceModel(
            initial=dist.Normal(0.0, 1.0).expand([2]).to_event(1),
            transition=lambda x, t: dist.Normal(phi[:, None] * x, jnp.exp(log_q)).to_event(1),
            emission=lambda x, t: dist.Normal(x, 0.5).to_event(1),
        )


    observations = jax.random.normal(jax.random.PRNGKey(1), (S, 8, 2))
    observations = observations.at[3, 6:].set(jnp.nan)
    mesh = jax.make_mesh((4,), ("series",))
    sharding = NamedSharding(mesh, PartitionSpec("series"))
    theta = jnp.concatenate([jnp.linspace(0.5, 0.9, S), jnp.array([-0.3])])
    for name, resampler in [
        ("diffusion", ndr.resampling.diffusion()),
        ("stop_gradient", ndr.resampling.stop_gradient(ndr.resampling.systematic())),
    ]:

        def log_likelihood(theta, series_sharding):
            return ndr.particle_filter(
                jax.random.PRNGKey(0),
                series_model(theta),
                observations,
                num_particles=16,
                resampler=resampler,
                batch_shape=(S,),
                series_sharding=series_sharding,
            ).log_likelihood.sum()

        one, one_grad = jax.jit(jax.value_and_grad(lambda t: log_likelihood(t, None)))(theta)
        four, four_grad = jax.jit(jax.value_and_grad(lambda t: log_likelihood(t, sharding)))(
            theta
        )
        assert abs(float(one - four)) <= 1e-10 * abs(float(one)), (name, one, four)
        assert float(jnp.max(jnp.abs(one_grad - four_grad))) <= 1e-10, (name, one_grad, four_grad)
        assert jnp.all(jnp.isfinite(four_grad)) and jnp.all(four_grad != 0), name
        print("series", name, "ok", float(one), float(four))

    """
)


@pytest.mark.slow
def test_sharded_particles_and_series_match_one_device(compile_fast_env):
    env = compile_fast_env("--xla_force_host_platform_device_count=4")
    env.pop("JAX_ENABLE_X64", None)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.count(" ok ") == 4, completed.stdout


def test_sharding_argument_is_checked():
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    import pytest

    import numpyro_diffres as ndr

    model = ndr.StateSpaceModel(
        initial=dist.Normal(0.0, 1.0),
        transition=lambda x, t: dist.Normal(x, 1.0),
        emission=lambda x, t: dist.Normal(x, 0.5),
    )
    with pytest.raises(TypeError, match="particle_sharding"):
        ndr.particle_filter(
            jax.random.PRNGKey(0), model, jnp.zeros(3), num_particles=8, particle_sharding="x"
        )


def test_series_sharding_needs_many_series_and_an_even_split():
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    import pytest

    import numpyro_diffres as ndr

    model = ndr.StateSpaceModel(
        initial=dist.Normal(0.0, 1.0),
        transition=lambda x, t: dist.Normal(x, jnp.ones(3)),
        emission=lambda x, t: dist.Normal(x, 0.5),
    )
    key = jax.random.PRNGKey(0)
    with pytest.raises(TypeError, match="series_sharding must be a jax.sharding.NamedSharding"):
        ndr.particle_filter(
            key, model, jnp.zeros((3, 4)), num_particles=8, batch_shape=(3,), series_sharding="x"
        )
