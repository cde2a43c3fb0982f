"""Scaling section `accuracy`: resampled-mean error against time, diffusion and OT."""

import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import OBSERVATION_VARIANCE, gaussian_example, posterior_mean  # noqa: E402
from benchmarks.scaling._shared import (  # noqa: E402
    SINGLE_CALL_SECONDS,
    _cell,
)
from benchmarks.scaling.gradient import _predicted  # noqa: E402


def _weighted_moments(log_weights, particles):
    log_weights = np.asarray(log_weights, np.float64)
    weights = np.exp(log_weights - log_weights.max())
    weights /= weights.sum()
    particles = np.asarray(particles, np.float64)
    mean = weights @ particles
    return mean, weights @ (particles - mean) ** 2


def accuracy_section(args):
    """Resampled-mean error against forward time: diffusion (K) and OT (epsilon) at several N."""
    d = args.accuracy_dimension
    exact_mean = posterior_mean(d)
    exact_variance = OBSERVATION_VARIANCE / (1.0 + OBSERVATION_VARIANCE)
    settings = [
        ("diffusion", f"K={k}", ndr.resampling.diffusion(num_steps=k))
        for k in args.accuracy_num_steps
    ] + [
        ("optimal_transport", f"epsilon={e}", ndr.resampling.optimal_transport(e).solve)
        for e in args.accuracy_epsilons
    ]
    seeds = range(args.accuracy_seeds)
    rows, history = [], {}
    with jax.enable_x64(True):
        for n in args.accuracy_sizes:
            data = [
                gaussian_example(jax.random.PRNGKey(10_000 + s), n, d, jnp.float64) for s in seeds
            ]
            keys = [jax.random.PRNGKey(20_000 + s) for s in seeds]
            inputs = [_weighted_moments(lw, x) for lw, x in data]
            for method, label, resampler in settings:
                row = {"method": method, "setting": label, "N": n, "d": d}
                predicted, previous_n = _predicted(history, (method, label), n)
                budget = None if predicted is None else predicted * len(seeds)
                if budget is not None and budget > args.max_accuracy_seconds:
                    row["estimated_forward_ms"] = 1e3 * predicted
                    row["note"] = (
                        f"not run: estimated {predicted:.0f} s per call from N={previous_n} "
                        f"(N^2 scaling), {len(seeds)} seeds > {args.max_accuracy_seconds:.0f} s"
                    )
                    rows.append(row)
                    print(row, flush=True)
                    continue
                compiled = jax.jit(resampler).lower(keys[0], *data[0]).compile()
                times, outputs = [], []
                for index, (key, (log_weights, particles)) in enumerate(
                    zip(keys, data, strict=True)
                ):
                    start = time.perf_counter()
                    output = jax.block_until_ready(compiled(key, log_weights, particles))
                    seconds = time.perf_counter() - start
                    if index == 0 and seconds <= SINGLE_CALL_SECONDS:
                        # Cheap: the first call was a warm-up; time it again.
                        start = time.perf_counter()
                        output = jax.block_until_ready(compiled(key, log_weights, particles))
                        seconds = time.perf_counter() - start
                    times.append(seconds)
                    outputs.append(output)
                means, variances = zip(
                    *(_weighted_moments(out[1], out[0]) for out in outputs), strict=True
                )
                input_means = np.array([m for m, _ in inputs])
                input_variances = np.array([v for _, v in inputs])
                means, variances = np.array(means), np.array(variances)

                def rms(difference):
                    return float(np.sqrt(np.mean(np.sum(difference**2, axis=1))))

                forward = statistics.median(times)
                history[(method, label)] = (n, forward)
                row |= {
                    "seeds": len(seeds),
                    "forward_ms": 1e3 * forward,
                    "rms_error": rms(means - exact_mean),
                    "input_rms_error": rms(input_means - exact_mean),
                    "resampler_rms_error": rms(means - input_means),
                    "variance_ratio": float(np.mean(variances) / exact_variance),
                    "input_variance_ratio": float(np.mean(input_variances) / exact_variance),
                }
                if method == "optimal_transport":
                    row["converged_fraction"] = float(
                        np.mean([bool(out[2].converged) for out in outputs])
                    )
                    row["sinkhorn_iterations"] = float(
                        np.mean([int(out[2].num_iterations) for out in outputs])
                    )
                rows.append(row)
                print(row, flush=True)
    return {"rows": rows, "comparisons": _equal_error_comparisons(rows, args.verdict_min_n)}


def _equal_error_comparisons(rows, min_n):
    """For each diffusion setting at N >= min_n: the fastest OT setting with no larger error."""
    measured = [row for row in rows if "rms_error" in row]
    transport = [row for row in measured if row["method"] == "optimal_transport"]
    comparisons = []
    for row in measured:
        if row["method"] != "diffusion" or row["N"] < min_n:
            continue
        matches = [other for other in transport if other["rms_error"] <= row["rms_error"]]
        best = min(matches, key=lambda other: other["forward_ms"], default=None)
        comparisons.append(
            {
                "diffusion": f"N={row['N']} {row['setting']}",
                "diffusion_error": row["rms_error"],
                "diffusion_ms": row["forward_ms"],
                "transport": None if best is None else f"N={best['N']} {best['setting']}",
                "transport_error": None if best is None else best["rms_error"],
                "transport_ms": None if best is None else best["forward_ms"],
                "transport_over_diffusion_time": (
                    None if best is None else best["forward_ms"] / row["forward_ms"]
                ),
            }
        )
    return comparisons


def _accuracy_markdown(report, comparisons_min_n):
    accuracy = report["accuracy"]
    rows = accuracy["rows"]
    seeds = next((row["seeds"] for row in rows if "seeds" in row), 0)
    d = rows[0]["d"] if rows else 0
    lines = [
        f"## Resampled-mean error against forward time (d = {d}, float64)",
        "",
        "Conjugate example of `benchmarks/resampling.py`: particles from the prior "
        "$N(0, I_d)$, log-weights the log-likelihood $N(y; x, 0.5 I_d)$ with $y = 1_d$; exact "
        "posterior mean $y / 1.5$ and variance $1/3$ per coordinate. Over "
        f"{seeds} seeds (the same data for every resampler at one N; relative Monte Carlo error "
        f"of an RMS about $1/\\sqrt{{2 S d}}$ = {1 / math.sqrt(2 * max(seeds, 1) * d):.2f}): "
        "RMS error of the resampled mean against the exact posterior mean, the same for the "
        "weighted input mean (the floor every resampler adds to), the RMS distance between the "
        "resampled and the weighted input mean (the resampler's own error), and the mean "
        "resampled per-coordinate variance over the exact one (input: weighted variance). "
        "Forward ms: median over the seeds' calls. OT's mean is the weighted mean whenever "
        "Sinkhorn converges (its plan's rows carry the weights), so the mean error cannot show "
        "OT's bias: its shrinking variance can.",
        "",
        "| N | resampler | setting | forward ms | mean RMS error | input floor | resampler's "
        "own error | variance ratio | input variance ratio | note |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "rms_error" not in row:
            lines.append(
                f"| {row['N']} | {row['method']} | {row['setting']} | - | - | - | - | - | - | "
                f"{row['note']} |"
            )
            continue
        note = ""
        if "converged_fraction" in row:
            note = (
                f"Sinkhorn converged {row['converged_fraction']:.0%}, "
                f"{row['sinkhorn_iterations']:.0f} iterations"
            )
        lines.append(
            f"| {row['N']} | {row['method']} | {row['setting']} | {row['forward_ms']:.1f} | "
            f"{row['rms_error']:.4f} | {row['input_rms_error']:.4f} | "
            f"{row['resampler_rms_error']:.4f} | {row['variance_ratio']:.3f} | "
            f"{row['input_variance_ratio']:.3f} | {note} |"
        )
    comparisons = accuracy["comparisons"]
    lines += [
        "",
        f"### At equal error (N >= {comparisons_min_n})",
        "",
        "For each diffusion setting, the fastest measured OT setting (any N, any epsilon) whose "
        "mean RMS error is no larger.",
        "",
        "| diffusion | error | ms | fastest OT with error <= | its error | its ms | "
        "OT time / diffusion time |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['diffusion']} | {c['diffusion_error']:.4f} | {c['diffusion_ms']:.1f} | "
            f"{c['transport'] or 'none measured'} | {_cell(c['transport_error'], '.4f')} | "
            f"{_cell(c['transport_ms'], '.1f')} | "
            f"{_cell(c['transport_over_diffusion_time'], '.1f')} |"
        )
    lines += ["", _verdict(comparisons, comparisons_min_n), ""]
    return lines


def _verdict(comparisons, min_n):
    matched = [c for c in comparisons if c["transport"] is not None]
    unmatched = [c["diffusion"] for c in comparisons if c["transport"] is None]
    if not comparisons:
        return "No diffusion setting at that N was measured: no verdict."
    faster = [c for c in matched if c["transport_over_diffusion_time"] > 1.0]
    text = f"Claim 'at equal resampled-mean error, diffusion is faster than OT at N >= {min_n}': "
    if len(faster) == len(matched):
        text += f"holds in this run for all {len(comparisons)} diffusion settings"
        if matched:
            ratios = [c["transport_over_diffusion_time"] for c in matched]
            text += f" (OT {min(ratios):.1f}x to {max(ratios):.1f}x slower where it matched)"
    else:
        slower = [c["diffusion"] for c in matched if c not in faster]
        text += f"does not hold for {', '.join(slower)}"
    if unmatched:
        text += (
            f"; no measured OT setting reached the error of {', '.join(unmatched)} (OT would "
            "need a larger N than measured there)"
        )
    return text + "."
