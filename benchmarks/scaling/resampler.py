"""Scaling section `resampler`: the diffusion resampler alone, up to large N."""

import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks.scaling._shared import (  # noqa: E402
    _cell,
    _time_calls,
)
from benchmarks.scaling.gradient import _predicted  # noqa: E402
from numpyro_diffres.resampling.attention import block_size  # noqa: E402


def resampler_section(args):
    """Forward time of the diffusion resampler alone, d = 4, K = 8, float64."""
    rows, history = [], {}
    resampler = ndr.resampling.diffusion()
    with jax.enable_x64(True):
        for n in args.resampler_sizes:
            if n > args.max_resampler_n:
                rows.append({"N": n, "note": "not compiled (N > --max-resampler-n)"})
                continue
            particles = jax.random.normal(jax.random.PRNGKey(0), (n, 4))
            log_weights = jax.random.normal(jax.random.PRNGKey(1), (n,))
            forward = jax.jit(lambda lw, x: resampler(jax.random.PRNGKey(2), lw, x)[0])
            start = time.perf_counter()
            compiled = forward.lower(log_weights, particles).compile()
            compile_seconds = time.perf_counter() - start
            row = {
                "N": n,
                "path": f"block-wise, {block_size(n, n)} queries",
                "temporary_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20,
                "compile_s": compile_seconds,
                "forward_ms": None,
                "runs": 0,
                "note": "",
            }
            predicted, previous_n = _predicted(history, "diffusion", n)
            if predicted is not None and predicted > args.max_resampler_call_seconds:
                row["estimated_s"] = predicted
                row["note"] = (
                    f"compiled only: estimated {predicted:.0f} s per call from N={previous_n} "
                    f"(N^2 scaling; > {args.max_resampler_call_seconds:.0f} s)"
                )
            else:
                seconds, row["runs"] = _time_calls(
                    compiled, log_weights, particles, repeats=args.repeats
                )
                row["forward_ms"] = 1e3 * seconds
                previous = history.get("diffusion")
                if previous is not None:
                    row["estimate_from_previous_s"] = previous[1] * (n / previous[0]) ** 2
                history["diffusion"] = (n, seconds)
            rows.append(row)
            print(row, flush=True)
    return rows


def _resampler_markdown(report):
    lines = [
        "## Diffusion resampler alone, forward (d = 4, K = 8, float64)",
        "",
        "Path: the attention runs block-wise over queries (one block of queries x N keys at "
        "a time, forward and backward; one block holds at most 2^22 entries). The N^2 column "
        "extrapolates the previous row's measured time by (N / N')^2: an estimate, shown to "
        "compare with the measurement.",
        "",
        "| N | path | compiled temporaries MiB | forward ms | runs | N^2 estimate from "
        "previous row, ms | note |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in report["resampler"]:
        if "path" not in row:
            lines.append(f"| {row['N']} | | | - | 0 | | {row['note']} |")
            continue
        estimate = row.get("estimate_from_previous_s", row.get("estimated_s"))
        lines.append(
            f"| {row['N']} | {row['path']} | {row['temporary_MiB']:.1f} | "
            f"{_cell(row['forward_ms'], '.1f')} | {row['runs']} | "
            f"{_cell(None if estimate is None else 1e3 * estimate, '.0f')} | {row['note']} |"
        )
    lines.append("")
    return lines
