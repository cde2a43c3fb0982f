"""What the scaling sections share: the AR(1) truth and data, the load, and the call timer.

`_time_calls` is this benchmark's own protocol (median of calls after one warm-up call, or one
call alone past `SINGLE_CALL_SECONDS`), kept so that the committed `results/scaling.md` keeps
its meaning; new scripts use `benchmarks._common.time_call`.
"""

import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks.models import ar1  # noqa: E402

TRUE = {"phi": 0.8, "q": 0.5, "r": 0.5}


# A call slower than this is timed once, without a warm-up call.
SINGLE_CALL_SECONDS = 2.0


def _ar1_observations(num_time_steps):
    with jax.enable_x64(True):
        _, observations = ndr.simulate(jax.random.PRNGKey(0), ar1(**TRUE), num_time_steps)
    return np.asarray(observations)


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _time_calls(function, *arguments, repeats):
    """`(seconds, runs)`: median of `repeats` calls after a warm-up call, or one call alone."""
    start = time.perf_counter()
    jax.block_until_ready(function(*arguments))
    first = time.perf_counter() - start
    if first > SINGLE_CALL_SECONDS:
        return first, 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), repeats


def _cell(value, spec):
    return "-" if value is None else format(value, spec)
