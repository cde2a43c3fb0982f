"""The memory-efficient attention (recomputing, block-wise reverse pass) equals the plain form."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_diffres import resampling

# By module path: `numpyro_diffres.resampling.diffusion` the attribute is the factory function.
attention_module = importlib.import_module("numpyro_diffres.resampling.attention")
diffusion_module = importlib.import_module("numpyro_diffres.resampling.diffusion")


def _plain(queries, keys, bias, scale):
    return jax.nn.softmax(bias + scale * queries @ keys.T, axis=1) @ keys


def _inputs(n, m, d, dtype, dropped=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    queries = jax.random.normal(k1, (n, d), dtype)
    keys = jax.random.normal(k2, (m, d), dtype)
    bias = jax.random.normal(k3, (m,), dtype)
    bias = bias.at[:dropped].set(-jnp.inf)
    cotangent = jax.random.normal(k4, (n, d), dtype)
    return queries, keys, bias, cotangent


def test_block_size_divides_and_fits():
    assert attention_module.block_size(64, 64) == 64
    size = attention_module.block_size(1000, 1000, max_entries=30_000)
    assert 1000 % size == 0 and size * 1000 <= 30_000
    assert attention_module.block_size(7, 100, max_entries=50) == 1
    # A prime number of queries (above the limit) gets full blocks plus padding, never one-row
    # blocks: N = 4099 at the default limit of 2^22 entries gives blocks of 1023 queries.
    assert attention_module.block_size(4099, 4099) == 2**22 // 4099
    assert attention_module.block_size(13, 13, max_entries=13 * 5) == 5


@pytest.mark.parametrize("block", [12, 5, 4, 1])
@pytest.mark.parametrize("dropped", [0, 3])
@pytest.mark.fixed_precision
def test_values_and_gradients_match_plain_form(block, dropped):
    # Block 5 does not divide the 12 queries: the last block is padded.
    with jax.enable_x64(True):
        queries, keys, bias, cotangent = _inputs(12, 9, 3, jnp.float64, dropped)
        scale = jnp.asarray(0.7, jnp.float64)

        def loss(function, q, k, b):
            return jnp.sum(function(q, k, b) * cotangent)

        def efficient(q, k, b):
            return attention_module.attention(q, k, b, scale, block=block)

        def plain(q, k, b):
            return _plain(q, k, b, scale)

        value, gradients = jax.value_and_grad(lambda *a: loss(efficient, *a), (0, 1, 2))(
            queries, keys, bias
        )
        expected, expected_gradients = jax.value_and_grad(lambda *a: loss(plain, *a), (0, 1, 2))(
            queries, keys, bias
        )
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip(gradients, expected_gradients, strict=True):
            # Dropped keys (-inf bias) have zero attention: their bias gradient is 0, not NaN.
            want = jnp.where(jnp.isfinite(want), want, 0.0)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
            assert jnp.all(jnp.isfinite(got))


@pytest.mark.fixed_precision
def test_diffusion_matches_the_plain_softmax_form_whole_and_blockwise(monkeypatch):
    """The resampler (custom-VJP attention, in one block or blocks of 8 queries) gives the
    values and gradients of the same integrator written with a plain softmax."""
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(0)
        particles = jax.random.normal(jax.random.PRNGKey(1), (48, 2), jnp.float64)
        log_weights = jax.random.normal(jax.random.PRNGKey(2), (48,), jnp.float64)
        resampler = resampling.diffusion(num_steps=4)

        def loss(log_weights, particles):
            output, _ = resampler(key, log_weights, particles)
            return jnp.sum(output**2)

        def plain_attention(queries, keys, bias, scale, *, block):
            del block
            return jax.nn.softmax(bias + scale * (queries @ keys.T), axis=1) @ keys

        whole = jax.value_and_grad(loss, (0, 1))(log_weights, particles)
        monkeypatch.setattr(attention_module, "_BLOCK_ENTRIES", 48 * 8)  # blocks of 8 queries
        assert attention_module.block_size(48, 48) == 8
        blockwise = jax.value_and_grad(loss, (0, 1))(log_weights, particles)
        monkeypatch.setattr(diffusion_module, "attention", plain_attention)
        plain = jax.value_and_grad(loss, (0, 1))(log_weights, particles)
        for result in (whole, blockwise):
            for got, want in zip(jax.tree.leaves(result), jax.tree.leaves(plain), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
