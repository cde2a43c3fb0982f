"""The argument checks of `particle_filter`: counts, series shape, observations, the model."""

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from numpyro_diffres._typing import Array
from numpyro_diffres._validation import (
    check_callable,
    check_count,
    check_fraction,
    check_optional_bool,
    particle_dtype,
)
from numpyro_diffres.filter_types import ParticleModel
from numpyro_diffres.resampling import Resampler, diffusion
from numpyro_diffres.sharding import particle_constraint
from numpyro_diffres.ssm import StateSpaceModel, warn_no_rsample
from numpyro_diffres.ssm_kernel import state_space_kernel

__all__ = [
    "check_batch_shape",
    "check_kernel",
    "check_model",
    "check_resampler",
    "check_resampler_input",
    "check_run_options",
]


def check_run_options(
    num_particles: int,
    ess_threshold: float,
    checkpoint: bool | None,
    resampler: Resampler | None,
    batch_shape: tuple[int, ...],
) -> dict[str, Any]:
    """Check `particle_filter`'s counts and options (see there): `run_filter`'s keywords."""
    return {
        "num_particles": check_count("num_particles", num_particles, minimum=2),
        "ess_threshold": check_fraction("ess_threshold", ess_threshold),
        "checkpoint": check_optional_bool("checkpoint", checkpoint),
        "resampler": check_resampler(resampler),
        "batch_shape": check_batch_shape(batch_shape),
    }


def check_kernel(
    model: StateSpaceModel,
    observations: Array,
    options: dict[str, Any],
    particle_sharding: jax.sharding.Sharding | None,
    series_sharding: jax.sharding.NamedSharding | None,
    dtype: DTypeLike | None,
) -> tuple[ParticleModel, Array, dict[str, Any]]:
    """Check the shardings and the model of `particle_filter` (see there); build its kernel.

    Args:
        model: the state-space model.
        observations: the observations, as given.
        options: what `check_run_options` returned.
        particle_sharding: see `particle_filter`.
        series_sharding: see `particle_filter`.
        dtype: see `particle_filter`.

    Returns:
        `(kernel, observations, options)`: the model's `state_space_kernel`, the observations
        as an array and `options` with the sharding constraint added.
    """
    batch_shape = options["batch_shape"]
    constrain = particle_constraint(
        particle_sharding, series_sharding, batch_shape, options["num_particles"]
    )
    observations = jnp.asarray(observations)
    dtype = check_model(model, observations, batch_shape, dtype)
    kernel = state_space_kernel(model, dtype=dtype, constrain=constrain, batch_shape=batch_shape)
    return kernel, observations, {**options, "constrain": constrain}


def check_resampler(resampler: Resampler | None) -> Resampler:
    """The resampler to use: `None` means the default, `resampling.diffusion()`, everywhere."""
    resampler = diffusion() if resampler is None else resampler
    check_callable(
        "resampler",
        resampler,
        "resampler(key, log_weights, particles)",
        "numpyro_diffres.resampling.diffusion()",
    )
    return resampler


def check_resampler_input(resampler: object, given_noise: bool, ess_threshold: float) -> None:
    """Refuse a key for a resampler that takes noise, or noise for one that takes a key.

    Raises:
        TypeError: the resampler's `takes_noise` trait does not match what the step is given
            (a `StepNoise` when `given_noise`, else a key); never when it is not called
            (`ess_threshold` 0).
    """
    takes_noise = bool(getattr(resampler, "takes_noise", False))
    if ess_threshold <= 0.0 or takes_noise == given_noise:
        return
    if given_noise:
        raise TypeError(
            f"The filter runs on explicit noise, but the resampler {resampler!r} takes a PRNG "
            "key; pass its noise-driven form, resampling.noise_driven(resampler)."
        )
    raise TypeError(
        f"The resampler {resampler!r} takes standard-normal noise, not a PRNG key: run it "
        "through the filter on explicit noise (noise.noise_filter, or particle_factor with "
        "noise='sampled'), or pass its key-driven form."
    )


def check_model(
    model: StateSpaceModel,
    observations: Array,
    batch_shape: tuple[int, ...],
    dtype: DTypeLike | None,
) -> jnp.dtype | None:
    """Check the model against the observations (warn where gradients are incomplete)."""
    if dtype is not None:
        dtype = particle_dtype(dtype)
    num_batch = len(batch_shape)
    shape = tuple(observations.shape)
    if batch_shape and (
        observations.ndim < num_batch + 1
        or shape[:num_batch] != batch_shape
        or shape[num_batch] < 1
    ):
        raise ValueError(
            f"with batch_shape={batch_shape} (one filter per series), observations must have "
            f"shape ({', '.join(str(size) for size in batch_shape)}, T, *observation_shape): "
            f"the series axes first, then time (shorter series NaN-padded at the end); got "
            f"{shape}."
        )
    if not batch_shape and (observations.ndim < 1 or shape[0] < 1):
        raise ValueError(
            f"observations must have shape (T, *observation_shape) with T >= 1, got {shape}."
        )
    info = model.check(shape[num_batch + 1 :], batch_shape=batch_shape)
    if dtype is not None and not jnp.issubdtype(info.state_dtype, jnp.floating):
        raise ValueError(
            f"dtype={dtype} applies to floating-point states; this model's initial distribution "
            f"draws {info.state_dtype} states. Leave dtype=None for discrete states."
        )
    if not info.initial_has_rsample:
        warn_no_rsample("initial")
    if not info.transition_has_rsample and model.proposal is None:
        warn_no_rsample("transition")
    return dtype


def check_batch_shape(batch_shape: object) -> tuple[int, ...]:
    """Return the series shape as a tuple of ints, or raise `TypeError`."""
    if not isinstance(batch_shape, tuple | list) or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1
        for size in batch_shape
    ):
        raise TypeError(
            f"batch_shape must be a tuple of positive ints (the series shape, e.g. (S,)), got "
            f"{batch_shape!r}."
        )
    return tuple(int(size) for size in batch_shape)
