"""blackjax NUTS on the potential of a NumPyro model (for example one using `particle_factor`).

`blackjax_nuts` builds the model's potential with `numpyro.infer.util.initialize_model`, adapts
the step size and a diagonal mass matrix with `blackjax.window_adaptation(blackjax.nuts, ...)`,
samples with `jax.lax.scan`, runs several chains with `jax.vmap`, and maps the draws back to
the constrained space with the model's `postprocess_fn` (deterministic sites included).

Which particle-filter noise the model sees: the potential built by `initialize_model` runs the
model with NumPyro's fixed default key, exactly as `MCMC(NUTS(...))` does, so
`numpyro.prng_key()` (and therefore `particle_factor` without an explicit `key`) returns the
same key at every evaluation and in every chain. All chains then sample the same fixed-noise
surrogate posterior $p(\\theta)\\,\\hat p_N(y \\mid \\theta; u)$, and this route and NumPyro's
NUTS target the same distribution. To use another noise draw, pass an explicit `key` to
`particle_factor` through a model argument.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer.util import initialize_model

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import (
    check_fraction,
    check_key,
    check_numpyro_model,
    check_positive,
)

__all__ = ["BlackjaxInfo", "BlackjaxResult", "blackjax_nuts", "to_inference_data"]

POSTPROCESS_BATCH_SIZE = 16


class BlackjaxInfo(NamedTuple):
    """Sampler diagnostics of `blackjax_nuts`, one row per chain.

    Attributes:
        diverging: whether each draw's trajectory diverged, `(chains, draws)`.
        acceptance_rate: mean Metropolis acceptance probability of each trajectory,
            `(chains, draws)`.
        num_integration_steps: leapfrog steps of each trajectory, `(chains, draws)`.
        step_size: adapted step size of each chain, `(chains,)`.
        inverse_mass_matrix: adapted (diagonal) inverse mass matrix of each chain, a pytree
            like the unconstrained parameters with a leading `(chains,)` axis.
    """

    diverging: Array
    acceptance_rate: Array
    num_integration_steps: Array
    step_size: Array
    inverse_mass_matrix: Any


class BlackjaxResult(NamedTuple):
    """What `blackjax_nuts` returns.

    Attributes:
        samples: constrained draws of every latent site (and deterministic site), a dict from
            site name to an array of shape `(chains, draws, *site_shape)`.
        info: `BlackjaxInfo` diagnostics.
    """

    samples: dict[str, Array]
    info: BlackjaxInfo


def blackjax_nuts(
    key: PRNGKey,
    model: Callable[..., Any],
    *model_args: Any,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 1,
    target_accept: float = 0.8,
    **model_kwargs: Any,
) -> BlackjaxResult:
    """Sample a NumPyro model's posterior with blackjax NUTS and window adaptation.

    Each chain starts from its own `init_to_uniform` point, runs `num_warmup` steps of
    Stan-style window adaptation (step size and diagonal mass matrix), then `num_samples` NUTS
    steps in a `jax.lax.scan`; the chains run side by side under `jax.vmap`. The log density is
    minus NumPyro's potential energy; a NaN log density counts as $-\\infty$ (the proposal is
    rejected) so invalid parameters can never enter the chain.

    Args:
        key: PRNG key for initialisation, adaptation and sampling.
        model: a NumPyro model (a callable emitting `numpyro.sample` / `factor` sites).
        *model_args: positional arguments of `model`.
        num_warmup: adaptation steps per chain, >= 1.
        num_samples: draws kept per chain, >= 1.
        num_chains: independent chains, >= 1.
        target_accept: target mean acceptance probability of the step-size adaptation, in
            (0, 1).
        **model_kwargs: keyword arguments of `model`.

    Returns:
        A `BlackjaxResult`; `samples[name]` has shape `(num_chains, num_samples, ...)`.

    Raises:
        TypeError: `key` is not a single PRNG key, `model` is not callable, or a count is
            not an int.
        ValueError: a non-positive count, or `target_accept` outside (0, 1).
    """
    target_accept = _check_arguments(key, model, num_warmup, num_samples, num_chains, target_accept)
    init_keys = jax.random.split(jax.random.fold_in(key, 0), num_chains)
    warmup_keys = jax.random.split(jax.random.fold_in(key, 1), num_chains)
    sample_keys = jax.random.split(jax.random.fold_in(key, 2), num_chains)

    # A batch of keys gives one `init_to_uniform` point per chain, found in one vmapped search.
    model_info = initialize_model(
        init_keys, model, model_args=model_args, model_kwargs=model_kwargs
    )
    potential_fn = model_info.potential_fn
    postprocess_fn = model_info.postprocess_fn
    initial_positions = model_info.param_info.z

    run_chain = _chain_runner(potential_fn, target_accept, num_warmup, num_samples)
    (positions, diverging, acceptance, steps), step_size, inverse_mass = jax.jit(
        jax.vmap(run_chain)
    )(warmup_keys, sample_keys, initial_positions)

    flat = jax.tree.map(lambda x: x.reshape(num_chains * num_samples, *x.shape[2:]), positions)
    constrained = jax.jit(
        lambda z: jax.lax.map(postprocess_fn, z, batch_size=POSTPROCESS_BATCH_SIZE)
    )(flat)
    samples = {
        name: value.reshape(num_chains, num_samples, *value.shape[1:])
        for name, value in constrained.items()
    }
    info = BlackjaxInfo(diverging, acceptance, steps, step_size, inverse_mass)
    return BlackjaxResult(samples, info)


def _check_arguments(key, model, num_warmup, num_samples, num_chains, target_accept) -> float:
    """Check `blackjax_nuts`'s arguments (see there); return `target_accept` as a float."""
    check_key(key, "key")
    check_numpyro_model(model)
    check_positive("num_warmup", num_warmup, integer=True)
    check_positive("num_samples", num_samples, integer=True)
    check_positive("num_chains", num_chains, integer=True)
    return check_fraction("target_accept", target_accept, include_zero=False, include_one=False)


def _chain_runner(potential_fn, target_accept, num_warmup, num_samples):
    """`(warmup_key, sample_key, position) -> (draws, step_size, inverse_mass_matrix)`.

    One chain of `blackjax_nuts`: window adaptation, then `num_samples` NUTS steps.
    """
    # Imported here: importing blackjax creates arrays, which starts JAX's backend, and at
    # package import that would silently defeat a later numpyro.set_host_device_count(...).
    import blackjax  # noqa: PLC0415

    def log_density(position):
        value = -potential_fn(position)
        return jnp.where(jnp.isnan(value), -jnp.inf, value)

    warmup = blackjax.window_adaptation(
        blackjax.nuts, log_density, target_acceptance_rate=target_accept
    )

    def run_chain(warmup_key, sample_key, position):
        (state, parameters), _ = warmup.run(warmup_key, position, num_steps=num_warmup)
        step = blackjax.nuts(log_density, **parameters).step

        def one_step(state, step_key):
            state, info = step(step_key, state)
            return state, (
                state.position,
                info.is_divergent,
                info.acceptance_rate,
                info.num_integration_steps,
            )

        _, draws = jax.lax.scan(one_step, state, jax.random.split(sample_key, num_samples))
        return draws, parameters["step_size"], parameters["inverse_mass_matrix"]

    return run_chain


def to_inference_data(result: BlackjaxResult):
    """ArviZ `InferenceData` with the draws as its posterior group (dims `chain`, `draw`).

    The diagnostics go to the `sample_stats` group as `diverging`, `acceptance_rate` and
    `n_steps`, the names ArviZ's plots and summaries look for.

    Args:
        result: what `blackjax_nuts` returned.

    Returns:
        `arviz.InferenceData`.

    Raises:
        ImportError: arviz is not installed.
        TypeError: `result` is not a `BlackjaxResult`.
    """
    if not isinstance(result, BlackjaxResult):
        raise TypeError(
            f"result must be the BlackjaxResult of blackjax_nuts, got {type(result).__name__}."
        )
    try:
        import arviz
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "to_inference_data needs arviz: pip install arviz (or 'numpyro_diffres[examples]')."
        ) from error
    posterior = {name: jax.device_get(value) for name, value in result.samples.items()}
    sample_stats = {
        "diverging": jax.device_get(result.info.diverging),
        "acceptance_rate": jax.device_get(result.info.acceptance_rate),
        "n_steps": jax.device_get(result.info.num_integration_steps),
    }
    return arviz.from_dict(posterior=posterior, sample_stats=sample_stats)
