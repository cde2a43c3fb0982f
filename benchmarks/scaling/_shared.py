"""What the scaling sections share: the AR(1) truth and data, and the call timer.

`_time_calls` is `benchmarks._common.time_call` with the settings this benchmark's committed
`results/scaling.md` was timed with: exactly `repeats` calls after the warm-up call (no
`min_seconds` extension), or the warm-up call alone when it takes more than
`SINGLE_CALL_SECONDS`; the sections pass functions they compiled themselves.
"""

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import time_call  # noqa: E402
from benchmarks.models import ar1  # noqa: E402

TRUE = {"phi": 0.8, "q": 0.5, "r": 0.5}


# A call slower than this is timed once, without a warm-up call.
SINGLE_CALL_SECONDS = 2.0


def _ar1_observations(num_time_steps):
    with jax.enable_x64(True):
        _, observations = ndr.simulate(jax.random.PRNGKey(0), ar1(**TRUE), num_time_steps)
    return np.asarray(observations)


def _time_calls(function, *arguments, repeats):
    """`(seconds, runs)` of `function(*arguments)` by `time_call` (module docstring)."""
    timing = time_call(
        function,
        arguments,
        repeats=repeats,
        min_seconds=0.0,
        max_runs=repeats,
        single_call_seconds=SINGLE_CALL_SECONDS,
    )
    return timing.median, timing.runs


def _cell(value, spec):
    return "-" if value is None else format(value, spec)
