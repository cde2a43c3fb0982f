"""The argument checks of `particle_filter`: series shape, observations against the model."""

import numbers

import jax.numpy as jnp
from jax.typing import DTypeLike

from numpyro_diffres._typing import Array
from numpyro_diffres._validation import check_callable, particle_dtype
from numpyro_diffres.resampling import Resampler, diffusion
from numpyro_diffres.ssm import StateSpaceModel, warn_no_rsample

__all__ = ["check_batch_shape", "check_model", "check_resampler"]


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
