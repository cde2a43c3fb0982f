"""Re-exports of `numpyro_diffres._log_density` (temporary: removed at merge)."""

# temporary: removed at merge, once filtering.py, resampling/base.py and resampling/adaptive.py
# import numpyro_diffres._log_density directly.
from numpyro_diffres._log_density import effective_sample_size, log_normalize, weighted_moments

__all__ = ["effective_sample_size", "log_normalize", "weighted_moments"]
