"""Argument validation: every check of an argument's type and value, in one place.

One bad value gets one error type and one message wherever it is passed: a count is an integer
(Python or NumPy, never a bool), a fraction is a real number in $[0, 1]$ (or a sub-interval with
open ends), a flag is a bool, a key is one PRNG key. Everything here runs at trace time on Python
values, so a mistake is reported before JAX compiles anything.
"""

import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_count",
    "check_fraction",
    "check_key",
    "check_kind",
    "check_name",
    "check_non_negative",
    "check_numpyro_model",
    "check_optional_bool",
    "check_positive",
    "particle_dtype",
]


def _is_real(value: object) -> bool:
    """Whether `value` is a real number (Python or NumPy); bools are not numbers here."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_positive(name: str, value: object, *, integer: bool = False) -> None:
    """Raise unless `value` is a positive finite number (a positive integer if `integer`).

    NumPy scalars count as numbers and NumPy integers as integers; bools are neither.

    Raises:
        TypeError: `value` is not a number (an integer when `integer`).
        ValueError: `value` is not positive and finite.
    """
    if integer:
        check_count(name, value, minimum=1)
        return
    if not _is_real(value):
        raise TypeError(f"{name} must be a positive number, got {value!r}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value!r}.")


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """Return `value` as an `int`, or raise unless it is an integer of at least `minimum`.

    Raises:
        TypeError: `value` is not an integer (a float such as `2.0` included).
        ValueError: `value` is below `minimum`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


def check_non_negative(name: str, value: object) -> float:
    """Return `value` as a `float`, or raise unless it is a finite real number $\\ge 0$.

    Raises:
        TypeError: `value` is not a real number.
        ValueError: `value` is negative or not finite.
    """
    if not _is_real(value):
        raise TypeError(f"{name} must be a non-negative number, got {value!r}.")
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
    return float(value)


def check_fraction(
    name: str,
    value: object,
    *,
    include_zero: bool = True,
    include_one: bool = True,
    meaning: str | None = None,
) -> float:
    """Return `value` as a `float`, or raise unless it is a real number in $[0, 1]$.

    Args:
        name: the argument's name, as the caller wrote it.
        value: the value passed.
        include_zero: whether 0 is allowed (else the interval is open at 0).
        include_one: whether 1 is allowed (else the interval is open at 1).
        meaning: what the ends mean, added to the message of the `ValueError`.

    Raises:
        TypeError: `value` is not a real number.
        ValueError: `value` lies outside the interval.
    """
    interval = f"{'[' if include_zero else '('}0, 1{']' if include_one else ')'}"
    if not _is_real(value):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}.")
    above = 0.0 <= value if include_zero else 0.0 < value
    below = value <= 1.0 if include_one else value < 1.0
    if not (above and below):
        reason = f" ({meaning});" if meaning else ","
        raise ValueError(f"{name} must lie in {interval}{reason} got {value!r}.")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """Return `value` as a `bool`, or raise `TypeError` unless it is one (Python or NumPy)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return `value`, or raise `ValueError` unless it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def check_optional_bool(name: str, value: object) -> bool | None:
    """Return `value`, or raise `TypeError` unless it is a bool (Python or NumPy) or None."""
    if value is None:
        return None
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"{name} must be True, False or None (decide automatically), got {value!r}."
        )
    return bool(value)


def check_name(value: object) -> str:
    """Return a NumPyro site name, or raise `TypeError` unless it is a non-empty `str`."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"name must be a non-empty str, got {value!r}.")
    return value


def check_kind(value: object, kind: type | Callable[[object], bool], requirement: str) -> None:
    """Raise `TypeError` unless `value` is of `kind`; the message states `requirement`.

    Args:
        value: the argument passed.
        kind: a class `value` must be an instance of, or a predicate such as `callable`.
        requirement: what the argument must be, e.g. `"soft(base=...) needs an index
            resampler"`; the message is `"{requirement}; got {value!r}."`.

    Raises:
        TypeError: `value` is not accepted.
    """
    accepted = isinstance(value, kind) if isinstance(kind, type) else kind(value)
    if not accepted:
        raise TypeError(f"{requirement}; got {value!r}.")


def check_callable(name: str, value: object, signature: str, example: str | None = None) -> None:
    """Raise `TypeError` unless `value` is callable; the message shows how it is called.

    Args:
        name: the argument's name.
        value: the argument passed.
        signature: how the library calls it, e.g. `"resampler(key, log_weights, particles)"`.
        example: a value that works, e.g. `"diffusion()"`, if any.

    Raises:
        TypeError: `value` is not callable.
    """
    suggestion = f", e.g. {example}" if example is not None else ""
    check_kind(value, callable, f"{name} must be callable as {signature}{suggestion}")


def check_numpyro_model(value: object, kind: str = "model") -> None:
    """Raise `TypeError` unless `value` (the argument `model`) is a callable NumPyro `kind`."""
    if not callable(value):
        raise TypeError(f"model must be a callable NumPyro {kind}, got {value!r}.")


def check_key(key: object, name: str = "key") -> None:
    """Raise `TypeError` unless `key` is one PRNG key (new-style or raw `uint32[2]`)."""
    if isinstance(key, jax.Array | jnp.ndarray):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return
    raise TypeError(
        f"{name} must be a single PRNG key from jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed); got {type(key).__name__} "
        f"{getattr(key, 'shape', '')} {getattr(key, 'dtype', '')}".rstrip()
        + "."
    )


def particle_dtype(dtype: DTypeLike) -> jnp.dtype:
    """Resolve the `dtype` argument of the filters: a floating dtype JAX can represent now.

    Raises:
        TypeError: `dtype` is not a floating dtype.
        ValueError: `dtype` is float64 while 64-bit JAX is off (it would silently be float32).
    """
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype such as jnp.float32, got {dtype!r}.")
    if jax.dtypes.canonicalize_dtype(resolved) != resolved:
        raise ValueError(
            f"dtype={resolved} needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
            "first, or use jnp.float32."
        )
    return resolved
