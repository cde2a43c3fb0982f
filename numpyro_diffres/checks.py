"""Re-exports of `numpyro_diffres._validation` (temporary: removed at merge)."""

# temporary: removed at merge, once filtering.py, smoothing.py, marginalize.py and
# resampling/adaptive.py import numpyro_diffres._validation directly.
from numpyro_diffres._validation import (
    check_callable,
    check_count,
    check_fraction,
    check_key,
    check_name,
    check_optional_bool,
    check_positive,
    particle_dtype,
)

__all__ = [
    "check_callable",
    "check_count",
    "check_fraction",
    "check_key",
    "check_name",
    "check_optional_bool",
    "check_positive",
    "particle_dtype",
]
