"""Memory-efficient softmax attention with a hand-written reverse pass.

The ensemble score of diffusion resampling needs, for $N$ query points $z_i$ and $M$ keys
$Z_j$ with log-weights (a bias $b_j$),

$$O_i = \\sum_j A_{ij} Z_j, \\qquad A = \\mathrm{softmax}_j(b_j + c\\, z_i \\cdot Z_j).$$

Plain reverse-mode autodiff stores every $(N, M)$ matrix $A$ for the backward pass. Here the
backward pass recomputes $A$ from the inputs, block by block over the queries, as
memory-efficient attention does, and uses $\\sum_j A_{ij} (G_i \\cdot Z_j) = G_i \\cdot O_i$ so the
softmax Jacobian needs no extra pass over the matrix. No $(N, M)$ matrix larger than one block of
queries is ever held, forward or backward: memory is $O(B M + N d)$ for block size $B$.
"""

import functools

import jax
import jax.numpy as jnp

from numpyro_diffres._typing import Array

__all__ = ["attention", "block_size"]

# Largest number of (query, key) entries one block holds: 2^22 entries is 32 MiB in float64.
_BLOCK_ENTRIES = 2**22


def block_size(num_queries: int, num_keys: int, max_entries: int | None = None) -> int:
    """Queries per block such that a block of `num_keys` columns fits `max_entries`.

    The largest divisor of `num_queries` within the limit when one of at least half the limit
    exists; otherwise the limit itself, and `attention` pads the queries to a multiple of it
    (a prime `num_queries` would otherwise give one-row blocks). The default `max_entries` is
    $2^{22}$ (32 MiB of float64 per block).
    """
    max_entries = _BLOCK_ENTRIES if max_entries is None else max_entries
    limit = max(1, max_entries // max(num_keys, 1))
    if num_queries <= limit:
        return num_queries
    for size in range(limit, (limit + 1) // 2 - 1, -1):
        if num_queries % size == 0:
            return size
    return limit


def attention(queries: Array, keys: Array, bias: Array, scale: Array, *, block: int) -> Array:
    """$\\mathrm{softmax}(b + c\\, Q K^\\top) K$ row by row, with a recomputing reverse pass.

    Args:
        queries: $Q$, shape `(N, d)`.
        keys: $K$, shape `(M, d)` (they are also the values).
        bias: $b$, shape `(M,)`; $-\\infty$ entries get zero attention.
        scale: $c$, a scalar (treated as a constant: no gradient flows to it).
        block: queries per block; when it does not divide `N` the queries are padded.

    Returns:
        Shape `(N, d)`.
    """
    return _attention(queries, keys, bias, scale, block)


def _softmax_rows(queries: Array, keys: Array, bias: Array, scale: Array) -> Array:
    logits = bias + scale * (queries @ keys.T)
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    weights = jnp.exp(logits)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _blocks(x: Array, block: int) -> Array:
    """`(n, ...)` as `(ceil(n / block), block, ...)`, zero rows appended where needed.

    A zero query row gives finite attention; a zero cotangent row adds nothing to the key and
    bias gradients; the padded rows' outputs are sliced off.
    """
    padding = -x.shape[0] % block
    if padding:
        x = jnp.concatenate([x, jnp.zeros((padding, *x.shape[1:]), x.dtype)])
    return x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _forward(queries, keys, bias, scale, block):
    n, d = queries.shape
    if block >= n:
        return _softmax_rows(queries, keys, bias, scale) @ keys
    outputs = jax.lax.map(
        lambda q: _softmax_rows(q, keys, bias, scale) @ keys, _blocks(queries, block)
    )
    return outputs.reshape(-1, d)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(queries, keys, bias, scale, block):
    return _forward(queries, keys, bias, scale, block)


def _attention_forward(queries, keys, bias, scale, block):
    outputs = _forward(queries, keys, bias, scale, block)
    return outputs, (queries, keys, bias, scale, outputs)


def _block_gradients(queries, outputs, cotangent, keys, bias, scale):
    """Gradients of one block of queries: `(d queries, d keys, d bias)`."""
    weights = _softmax_rows(queries, keys, bias, scale)
    # dL/dlogits = A * (G K^T - rowsum(A * G K^T)), and rowsum(A * G K^T) = rowsum(G * O).
    row = jnp.sum(cotangent * outputs, axis=1, keepdims=True)
    logits_cotangent = weights * (cotangent @ keys.T - row)
    queries_cotangent = scale * (logits_cotangent @ keys)
    # Written as (d, B) @ (B, M) products, transposed at the end: `weights.T @ cotangent` made
    # XLA copy each (B, M) matrix into its transpose first, which at d = 1 cost more than the
    # products themselves.
    keys_cotangent = (cotangent.T @ weights + scale * (queries.T @ logits_cotangent)).T
    bias_cotangent = jnp.sum(logits_cotangent, axis=0)
    return queries_cotangent, keys_cotangent, bias_cotangent


def _attention_backward(block, residuals, cotangent):
    queries, keys, bias, scale, outputs = residuals
    n = queries.shape[0]
    if block >= n:
        queries_cotangent, keys_cotangent, bias_cotangent = _block_gradients(
            queries, outputs, cotangent, keys, bias, scale
        )
    else:

        def accumulate(carry, inputs):
            keys_total, bias_total = carry
            q, o, g = inputs
            q_cotangent, k_cotangent, b_cotangent = _block_gradients(q, o, g, keys, bias, scale)
            return (keys_total + k_cotangent, bias_total + b_cotangent), q_cotangent

        (keys_cotangent, bias_cotangent), queries_cotangent = jax.lax.scan(
            accumulate,
            (jnp.zeros_like(keys), jnp.zeros_like(bias)),
            (_blocks(queries, block), _blocks(outputs, block), _blocks(cotangent, block)),
        )
        queries_cotangent = queries_cotangent.reshape(-1, queries.shape[1])[:n]
    # The bias may hold -inf (dropped particles): their columns have zero attention and must
    # get a zero, not NaN, cotangent.
    bias_cotangent = jnp.where(jnp.isfinite(bias), bias_cotangent, 0.0)
    return queries_cotangent, keys_cotangent, bias_cotangent, jnp.zeros_like(scale)


_attention.defvjp(_attention_forward, _attention_backward)
