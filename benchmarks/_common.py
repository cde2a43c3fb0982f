"""Shared benchmark plumbing: one timing protocol, one table writer, one report writer.

Also the conjugate Gaussian example that `resampling.py` and `scaling.py` both measure
resampled-mean error on (`gaussian_example`, `posterior_mean`).

Timing protocol (`time_call`): compile the function with `jax.jit(...).lower(...).compile()`
(unless it comes compiled), run it once as a warm-up, then time calls that each end with
`jax.block_until_ready`, at least `repeats` of them and more while their total is under
`min_seconds`; report the median. With `single_call_seconds`, a warm-up call slower than that is
the only call: its time is reported, from one run. Two tables timed this way in the same run can
be compared; absolute times depend on the machine's load, which `run_metadata` records
(`os.getloadavg` at the start, `load_line` at the end).

Report writer (`write_report`): the report's `meta` entry comes from `run_metadata` (date,
machine, CPUs, versions, load at the start, the script's settings) and is finished by
`finish_metadata` (load at the end, total seconds); the JSON is written and its rendering beside
it, so that every committed table is its script's `render` of the committed JSON.
"""

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "OBSERVATION",
    "OBSERVATION_VARIANCE",
    "Timing",
    "finish_metadata",
    "format_number",
    "gaussian_example",
    "load_average",
    "load_line",
    "markdown_table",
    "posterior_mean",
    "run_metadata",
    "time_call",
    "write_report",
]

# The conjugate example: y | x ~ N(x, OBSERVATION_VARIANCE I), x ~ N(0, I), y = OBSERVATION 1_d.
OBSERVATION = 1.0
OBSERVATION_VARIANCE = 0.5


def gaussian_example(key, n: int, d: int, dtype) -> tuple:
    """Prior particles and log-likelihood weights of the conjugate example, `(lw, x)`."""
    particles = jax.random.normal(key, (n, d), dtype)
    observation = jnp.full((d,), OBSERVATION, dtype)
    log_weights = -0.5 * jnp.sum((observation - particles) ** 2, axis=1) / OBSERVATION_VARIANCE
    return log_weights, particles


def posterior_mean(d: int) -> np.ndarray:
    """Exact posterior mean of the conjugate example."""
    return np.full((d,), OBSERVATION / (1.0 + OBSERVATION_VARIANCE))


class Timing(NamedTuple):
    """Result of `time_call`; all times in seconds.

    Attributes:
        median: median wall time of the timed calls.
        runs: number of timed calls.
        compile: time to lower and compile.
        warmup: time of the first (untimed) call.
        output: the warm-up call's output, e.g. to check results.
    """

    median: float
    runs: int
    compile: float
    warmup: float
    output: Any


def time_call(
    function: Callable,
    args: Sequence,
    *,
    repeats: int = 5,
    min_seconds: float = 0.5,
    max_runs: int | None = None,
    single_call_seconds: float | None = None,
) -> Timing:
    """Time `jax.jit(function)(*args)` by the shared protocol (module docstring).

    Args:
        function: a jittable function of `args`, or one already compiled for them
            (`jax.stages.Compiled`, as when its `memory_analysis()` is read first), which is
            timed as it is (compile time 0).
        args: positional arguments (arrays or pytrees of arrays).
        repeats: minimum number of timed calls.
        min_seconds: keep timing until the timed calls add up to this much.
        max_runs: cap on timed calls (default `10 * repeats`).
        single_call_seconds: if the warm-up call takes longer, it is the measurement
            (`runs` 1) and no further call is made (default: never).

    Returns:
        A `Timing`.
    """
    max_runs = 10 * repeats if max_runs is None else max_runs
    start = time.perf_counter()
    if isinstance(function, jax.stages.Compiled):
        compiled = function
    else:
        compiled = jax.jit(function).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    output = jax.block_until_ready(compiled(*args))
    warmup_seconds = time.perf_counter() - start
    if single_call_seconds is not None and warmup_seconds > single_call_seconds:
        return Timing(warmup_seconds, 1, compile_seconds, warmup_seconds, output)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), len(times), compile_seconds, warmup_seconds, output)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 2 decimals."""
    return [round(x, 2) for x in os.getloadavg()]


def run_metadata(**settings: Any) -> dict:
    """Date, machine, versions and the load at the start; `settings` are stored alongside.

    Call `finish_metadata` (via `write_report`) at the end to add the end load and duration.
    """
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python_version": platform.python_version(),
        "jax_version": jax.__version__,
        "load_start": load_average(),
        "started": time.perf_counter(),
        **settings,
    }


def finish_metadata(meta: dict) -> dict:
    """Add the end load and the duration to `meta` from `run_metadata`.

    Once only: a stored report's metadata, already finished, is left as it is.
    """
    if "started" in meta:
        meta["load_end"] = load_average()
        meta["total_seconds"] = time.perf_counter() - meta.pop("started")
    return meta


def load_line(meta: dict) -> str:
    """One markdown line: when, where, how long, and the machine's load at start and end."""
    return (
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_count']} CPUs), jax "
        f"{meta['jax_version']}; total {meta.get('total_seconds', float('nan')):.0f} s. "
        f"Load average (1/5/15 min) at start {meta['load_start']}, at end "
        f"{meta.get('load_end', '-')}: other processes share the CPUs, so compare times "
        "within this run only."
    )


def format_number(value: Any, digits: int = 3) -> str:
    """`value` for a table cell: `-` for None, `digits` significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 10**digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | None = None
) -> str:
    """A markdown table; cells go through `format_number` unless already strings.

    Args:
        headers: column titles.
        rows: one sequence of cells per row, as long as `headers`.
        align: one character per column, `l` or `r` (default: `l` for the first column,
            `r` for the others).

    Returns:
        The table, lines joined by newlines, without a trailing newline.

    Raises:
        ValueError: a row or `align` of another length than `headers`.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns.")
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns.")
        cells = [cell if isinstance(cell, str) else format_number(cell) for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path: Path, report: dict, render: Callable[[dict], str]) -> str:
    """Finish `report["meta"]`, write `path` (JSON) and the markdown beside it (`.md`).

    Args:
        path: JSON output path; the markdown goes to `path.with_suffix(".md")`.
        report: the results, with a `meta` entry from `run_metadata`.
        render: `report -> markdown`, called after the end load and duration are added.

    Returns:
        The markdown text.
    """
    finish_metadata(report["meta"])
    text = render(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    path.with_suffix(".md").write_text(text)
    return text


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
