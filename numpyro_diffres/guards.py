"""Re-exports of `numpyro_diffres._log_density` (temporary: removed at merge)."""

# temporary: removed at merge, once filtering.py, smoothing.py and marginalize.py import
# numpyro_diffres._log_density directly.
from numpyro_diffres._log_density import fill_missing, guard, safe_log_prob

__all__ = ["fill_missing", "guard", "safe_log_prob"]
