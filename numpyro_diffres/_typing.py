"""Type aliases shared across the package."""

from typing import TypeAlias

import jax

Array: TypeAlias = jax.Array
PRNGKey: TypeAlias = jax.Array

__all__ = ["Array", "PRNGKey"]
