r"""Speed and accuracy of every resampler, with a per-particle diffusion baseline.

For each particle count $N$, dimension $d$ and dtype, every resampler is timed on one call
(forward) and on one call plus reverse-mode gradient (forward+gradient) of the scalar
$\sum_j w^*_j |X^*_j|^2$ with respect to both the input log-weights and particles; times are
medians over at least five runs of the jit-compiled function after compilation and one
warm-up run.

Accuracy is measured on a conjugate Gaussian example: prior $x \sim N(0, I_d)$, likelihood
$y \mid x \sim N(x, s^2 I_d)$ with a fixed observation $y$, particles drawn from the prior and
log-weights equal to the log-likelihood. The exact posterior mean is $y / (1 + s^2)$; the
table reports $\sqrt{E\,|\hat m - m|^2}$ (Euclidean norm over the $d$ coordinates, mean over
seeds) for the output-weighted mean $\hat m = \sum_j w^*_j X^*_j$ of the resampled cloud. The
row "input (weighted, no resampling)" is the self-normalised importance-sampling estimate before
resampling: the floor every resampler adds its own error to.

`diffusion_per_particle` is diffusion resampling written the way the paper's reference code is
structured: a `jax.vmap` over output particles of a function that, for one query point,
computes the ensemble score from its squared distances to every particle and integrates the
exponential probability-flow ODE. It performs the same arithmetic as
`numpyro_diffres.resampling.diffusion()` (attention form), and the script asserts in float64
that both give the same particles and gradients for the same key. Only ratios measured within
one run are meaningful: other processes share this machine.

Usage:
    python benchmarks/resampling.py                 # full run, about 15-20 minutes on 2 cores
    python benchmarks/resampling.py --quick --out /tmp/r.json   # smoke test, under a minute
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import (  # noqa: E402
    OBSERVATION,
    OBSERVATION_VARIANCE,
    gaussian_example,
    posterior_mean,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "resampling.json"

# Largest number of (N x N) matrix entries a batch of the accuracy map may hold at once.
ACCURACY_BATCH_ENTRIES = 2**25

INPUT_ROW = "input (weighted, no resampling)"
PER_PARTICLE = "diffusion_per_particle"
PER_PARTICLE_TRANSPOSED = "diffusion_per_particle_transposed"
PER_PARTICLE_BASELINES = (PER_PARTICLE, PER_PARTICLE_TRANSPOSED)


def per_particle_diffusion(
    num_steps: int = 8,
    time_horizon: float = 1.0,
    rate: float = 1.0,
    jitter: float = 1e-6,
    *,
    transposed: bool = False,
) -> Callable:
    r"""Diffusion resampling structured per output particle (reference-style baseline).

    Whitening follows the package convention (weighted mean, per-coordinate weighted standard
    deviation with the relative floor `jitter` and an absolute floor $\sqrt{\text{tiny}}$), and
    the initial noise is drawn as `jax.random.normal(split(key)[0], (N, d))`, so the output
    matches `ndr.resampling.diffusion()` for the same key.

    `transposed` only changes the memory layout the per-particle function reads: the whitened
    cloud as `(d, N)` (particle index minor) instead of `(N, d)`. The arithmetic is identical,
    but XLA's CPU code for the per-particle function runs at very different speeds with the
    two layouts (both rows of `benchmarks/results/resampling.md`), so the speed of a
    "per-particle" implementation depends on this detail and both are reported.
    """
    delta = time_horizon / num_steps

    def resample(key, log_weights, particles):
        n, d = particles.shape
        dtype = particles.dtype
        log_weights = log_weights - jax.scipy.special.logsumexp(log_weights)
        weights = jnp.exp(log_weights)
        mean = weights @ particles
        variance = weights @ (particles - mean) ** 2
        scale = jnp.sqrt(variance * (1.0 + jitter) + jnp.sqrt(jnp.finfo(dtype).tiny))
        data = (particles - mean) / scale

        data_transposed = data.T

        def score(z, s):
            # Ensemble score of the OU-noised weighted cloud at forward time s, one query z (d,).
            decay = jnp.exp(-rate * s)
            variance_s = -jnp.expm1(-2.0 * rate * s)
            if transposed:
                squared = jnp.sum((z[:, None] - decay * data_transposed) ** 2, axis=0)
            else:
                squared = jnp.sum((z[None, :] - decay * data) ** 2, axis=1)
            alpha = jax.nn.softmax(log_weights - squared / (2.0 * variance_s))
            mixed = data_transposed @ alpha if transposed else alpha @ data
            return (decay * mixed - z) / variance_s

        def transport(z):
            def step(z, k):
                s = time_horizon - k * delta
                z = math.exp(rate * delta) * z + math.expm1(rate * delta) * score(z, s)
                return z, None

            z, _ = jax.lax.scan(step, z, jnp.arange(num_steps, dtype=dtype))
            return z

        init_key, _ = jax.random.split(key)
        z = jax.random.normal(init_key, (n, d), dtype)
        z = jax.vmap(transport)(z)
        return mean + scale * z, jnp.full((n,), -math.log(n), dtype)

    return resample


def build_resamplers() -> dict[str, Callable]:
    """The resamplers under test, by table name, with the defaults used in the paper's tables."""
    resampling = ndr.resampling
    return {
        # Diagonal whitening: the arithmetic of the per-particle baseline, which the script checks
        # to rounding (the default whitens fully for d > 1; `benchmarks/gradients.py` times both).
        "diffusion": resampling.diffusion(covariance="diagonal"),
        PER_PARTICLE: per_particle_diffusion(),
        PER_PARTICLE_TRANSPOSED: per_particle_diffusion(transposed=True),
        "multinomial": resampling.multinomial(),
        "systematic": resampling.systematic(),
        "stratified": resampling.stratified(),
        "stop_gradient": resampling.stop_gradient(resampling.systematic()),
        "soft": resampling.soft(0.5),
        "gumbel_softmax": resampling.gumbel_softmax(0.3),
        "optimal_transport": resampling.optimal_transport(0.5),
    }


def loss_function(resampler: Callable) -> Callable:
    """`(log_weights, particles, key) -> sum_j w*_j |X*_j|^2`, the differentiated scalar."""

    def loss(log_weights, particles, key):
        new_particles, new_log_weights = resampler(key, log_weights, particles)
        return jnp.sum(jnp.exp(new_log_weights) * jnp.sum(new_particles**2, axis=1))

    return loss


def time_compiled(function: Callable, args: tuple) -> dict:
    """Compile `function` for `args` and run it once to warm up; times in seconds."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    output = jax.block_until_ready(compiled(*args))
    warmup_seconds = time.perf_counter() - start
    return {
        "compiled": compiled,
        "output": output,
        "compile_s": compile_seconds,
        "warmup_s": warmup_seconds,
    }


def repeat(compiled: Callable, args: tuple, repeats: int, min_seconds: float) -> list[float]:
    """Wall-clock times of `repeats` or more runs (more while under `min_seconds` in all)."""
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 10 * repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def accuracy(forward: Callable, n: int, d: int, dtype, seeds: int) -> dict:
    """RMS error of the output-weighted mean against the exact posterior mean, over seeds.

    `forward` is the already compiled `(key, log_weights, particles) -> (particles,
    log_weights[, info])` for this shape, called once per seed: on this 2-core machine that
    is faster than compiling a second, seed-batched program for every configuration.
    """
    data_keys, resample_keys = jax.vmap(jax.random.split, out_axes=1)(
        jax.random.split(jax.random.key(12345), seeds)
    )
    input_means, output_means, converged = [], [], []
    for data_key, resample_key in zip(data_keys, resample_keys, strict=True):
        log_weights, particles = _example(data_key, n, d, dtype)
        new_particles, new_log_weights, *info = forward(resample_key, log_weights, particles)
        input_means.append(_weighted_mean(log_weights, particles))
        output_means.append(_weighted_mean(new_log_weights, new_particles))
        converged.append(bool(info[0].converged) if info else True)
    exact = posterior_mean(d)

    def rms(means):
        squared = np.sum((np.asarray(means, np.float64) - exact) ** 2, axis=1)
        return float(np.sqrt(np.mean(squared)))

    return {
        "rms_error": rms(output_means),
        "input_rms_error": rms(input_means),
        "seeds": seeds,
        "converged_fraction": float(np.mean(converged)),
    }


_example = jax.jit(gaussian_example, static_argnums=(1, 2, 3))


@jax.jit
def _weighted_mean(log_weights, particles):
    return jax.nn.softmax(log_weights.astype(jnp.float64)) @ particles.astype(jnp.float64)


def predicted_seconds(history: dict, key: tuple, n: int, exponent: float) -> float | None:
    """Extrapolate a call time from the largest smaller N measured, as $t (N/N')^{exponent}$."""
    previous = history.get(key)
    if previous is None:
        return None
    previous_n, seconds = previous
    return seconds * (n / previous_n) ** exponent


def benchmark_one(name, resampler, n, d, dtype, args, history, options) -> dict:
    """Forward, forward+gradient and accuracy of one resampler at one (N, d, dtype)."""
    dtype_name = jnp.dtype(dtype).name
    row = {"resampler": name, "n": n, "d": d, "dtype": dtype_name}
    if name in PER_PARTICLE_BASELINES and n > options.per_particle_max_n:
        reason = (
            f"per-particle baseline only run up to N={options.per_particle_max_n} "
            "(--per-particle-max-n); it is the O(N^2) reference for the N=1024 ratio"
        )
        row.update(status="skipped", reason=reason)
        return row
    key, log_weights, particles = args
    row["status"] = "ok"
    skipped = []
    outputs = {}
    compiled_forward = None
    for mode, function, call_args in (
        # OT's `solve` also returns its Sinkhorn convergence flag, for the accuracy notes.
        ("forward", getattr(resampler, "solve", resampler), (key, log_weights, particles)),
        (
            "gradient",
            jax.value_and_grad(loss_function(resampler), argnums=(0, 1)),
            (log_weights, particles, key),
        ),
    ):
        history_key = (name, dtype_name, d, mode)
        predicted = predicted_seconds(history, history_key, n, options.extrapolation_exponent)
        if predicted is not None and predicted > options.max_call_seconds:
            skipped.append(
                f"{mode}: predicted {predicted:.0f} s per call "
                f"(> {options.max_call_seconds:.0f} s) from N={history[history_key][0]}"
            )
            history[history_key] = (n, predicted)
            continue
        compiled = time_compiled(function, call_args)
        row[f"{mode}_compile_s"] = compiled["compile_s"]
        if compiled["warmup_s"] > options.max_call_seconds:
            skipped.append(
                f"{mode}: one call took {compiled['warmup_s']:.0f} s "
                f"(> {options.max_call_seconds:.0f} s)"
            )
            history[history_key] = (n, compiled["warmup_s"])
            continue
        times = repeat(compiled["compiled"], call_args, options.repeats, options.min_seconds)
        row[f"{mode}_ms"] = 1e3 * statistics.median(times)
        row[f"{mode}_runs"] = len(times)
        history[history_key] = (n, statistics.median(times))
        outputs[mode] = compiled["output"]
        compiled_forward = compiled["compiled"] if mode == "forward" else compiled_forward
    # Accuracy runs the forward pass once per seed: skip it when that alone would be too slow.
    forward = history.get((name, dtype_name, d, "forward"))
    accuracy_estimate = None if forward is None else forward[1] * options.seeds
    if "forward_ms" not in row:
        skipped.append("accuracy: forward pass skipped")
    elif accuracy_estimate > options.max_accuracy_seconds:
        skipped.append(
            f"accuracy: {options.seeds} seeds x {forward[1]:.1f} s > "
            f"{options.max_accuracy_seconds:.0f} s"
        )
    else:
        row.update(accuracy(compiled_forward, n, d, dtype, options.seeds))
    if skipped:
        row["status"] = "partial" if ("forward_ms" in row or "rms_error" in row) else "skipped"
        row["reason"] = "; ".join(skipped)
    row["outputs"] = outputs
    return row


def check_per_particle(rows: dict, n: int, d: int) -> list[dict]:
    """Assert that each per-particle baseline and `diffusion()` agree (float64, same key)."""
    package = rows.get("diffusion", {}).get("outputs", {})
    checks = []
    for baseline in PER_PARTICLE_BASELINES:
        reference = rows.get(baseline, {}).get("outputs", {})
        check = {"baseline": baseline, "n": n, "d": d}
        for mode in ("forward", "gradient"):
            if mode not in reference or mode not in package:
                continue
            expected = jax.tree_util.tree_leaves(reference[mode])
            actual = jax.tree_util.tree_leaves(package[mode])
            difference = 0.0
            for want, got in zip(expected, actual, strict=True):
                want, got = np.asarray(want), np.asarray(got)
                scale = max(1.0, float(np.max(np.abs(want))))
                np.testing.assert_allclose(
                    got,
                    want,
                    rtol=1e-7,
                    atol=1e-9 * scale,
                    err_msg=f"{baseline} != diffusion() ({mode}, N={n}, d={d})",
                )
                difference = max(difference, float(np.max(np.abs(got - want))))
            check[f"{mode}_max_abs_difference"] = difference
        if len(check) > 3:
            checks.append(check)
    return checks


def speed_ratios(results: list[dict]) -> list[dict]:
    """Per-particle time over `diffusion()` time (float64), i.e. how many times faster."""
    ratios = []
    index = {(r["resampler"], r["n"], r["d"], r["dtype"]): r for r in results}
    for (name, n, d, dtype), row in sorted(index.items(), key=lambda item: item[0][1:]):
        if name != "diffusion" or dtype != "float64":
            continue
        for baseline in PER_PARTICLE_BASELINES:
            reference = index.get((baseline, n, d, dtype))
            if reference is None:
                continue
            entry = {"baseline": baseline, "n": n, "d": d, "dtype": dtype}
            for mode in ("forward", "gradient"):
                if f"{mode}_ms" in row and f"{mode}_ms" in reference:
                    entry[f"per_particle_{mode}_ms"] = reference[f"{mode}_ms"]
                    entry[f"diffusion_{mode}_ms"] = row[f"{mode}_ms"]
                    entry[f"{mode}_speedup"] = reference[f"{mode}_ms"] / row[f"{mode}_ms"]
            if len(entry) > 4:
                ratios.append(entry)
    return ratios


def _format(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict) -> str:
    """The results as markdown: a speed-ratio table, then one row per measurement."""
    meta = report["meta"]
    lines = [
        "# Resampler benchmark",
        "",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_count']} CPUs), jax "
        f"{meta['jax_version']}; total {meta['total_seconds']:.0f} s. Load average at start / "
        f"end: {meta['load_start']} / {meta['load_end']} (other processes share the CPUs: "
        "compare within this run only).",
        "",
        "Times: median ms of the jit-compiled call after compilation and a warm-up "
        f"(at least {meta['repeats']} runs). Forward+gradient: value and gradient of "
        "$\\sum_j w^*_j |X^*_j|^2$ with respect to log-weights and particles. RMS error: "
        "$\\sqrt{E|\\hat m - m|^2}$ of the output-weighted mean against the exact posterior "
        f"mean, prior $N(0, I_d)$, likelihood $N(y; x, {OBSERVATION_VARIANCE} I_d)$, "
        f"$y = {OBSERVATION}\\cdot 1_d$; the number of seeds is in its own column (relative "
        "Monte Carlo error of an RMS over S seeds is about $1/\\sqrt{2 S d}$).",
        "",
        "## Diffusion (attention form) vs the per-particle baseline, float64",
        "",
        "Speed-up = per-particle time / `diffusion()` time, measured in the same run. "
        f"`{PER_PARTICLE}` reads the whitened cloud as (N, d), "
        f"`{PER_PARTICLE_TRANSPOSED}` as (d, N); same arithmetic, different memory layout. "
        "The paper's reference code, measured on a quiet machine (SPEC section 7), took "
        "64 / 230 ms forward and 323 / 969 ms forward+gradient at N=1024, d=1 / 4.",
        "",
        "| N | d | baseline | per-particle fwd ms | diffusion fwd ms | fwd speed-up "
        "| per-particle fwd+grad ms | diffusion fwd+grad ms | fwd+grad speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ratio in report["speed_ratios"]:
        lines.append(
            f"| {ratio['n']} | {ratio['d']} | {ratio['baseline']} "
            f"| {_format(ratio.get('per_particle_forward_ms'))} "
            f"| {_format(ratio.get('diffusion_forward_ms'))} "
            f"| {_format(ratio.get('forward_speedup'))}x "
            f"| {_format(ratio.get('per_particle_gradient_ms'))} "
            f"| {_format(ratio.get('diffusion_gradient_ms'))} "
            f"| {_format(ratio.get('gradient_speedup'))}x |"
        )
    lines += [
        "",
        "Correctness check (float64, same key): each per-particle baseline and `diffusion()` "
        "agree (asserted, rtol 1e-7); largest absolute differences:",
        "",
    ]
    for check in report["checks"]:
        lines.append(
            f"- {check['baseline']}, N={check['n']}, d={check['d']}: particles "
            f"{check.get('forward_max_abs_difference', float('nan')):.1e}, value and gradient "
            f"{check.get('gradient_max_abs_difference', float('nan')):.1e}"
        )
    lines += [
        "",
        "## All measurements",
        "",
        "| dtype | d | N | resampler | fwd ms | fwd+grad ms | RMS error | seeds | notes |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in report["results"]:
        notes = row.get("reason", "")
        if row.get("converged_fraction", 1.0) < 1.0:
            notes = (notes + "; " if notes else "") + (
                f"Sinkhorn converged in {100 * row['converged_fraction']:.0f}% of seeds"
            )
        lines.append(
            f"| {row['dtype']} | {row['d']} | {row['n']} | {row['resampler']} "
            f"| {_format(row.get('forward_ms'))} | {_format(row.get('gradient_ms'))} "
            f"| {_format(row.get('rms_error'))} | {_format(row.get('seeds'))} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke-test subset (<1 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (.md beside)")
    parser.add_argument("--dtypes", nargs="+", choices=["float64", "float32"], default=None)
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="particle counts N")
    parser.add_argument("--dims", nargs="+", type=int, default=None, help="dimensions d")
    parser.add_argument("--resamplers", nargs="+", default=None, help="subset, by table name")
    parser.add_argument("--seeds", type=int, default=None, help="accuracy seeds")
    parser.add_argument("--repeats", type=int, default=5, help="minimum timed runs")
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="keep timing fast calls this long"
    )
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        default=6.0,
        help="skip a measurement whose single call (warm-up, or predicted from a smaller N) "
        "takes longer: pathological for one resampling step, and 5 repeats would eat the budget",
    )
    parser.add_argument("--max-accuracy-seconds", type=float, default=60.0)
    parser.add_argument(
        "--extrapolation-exponent",
        type=float,
        default=2.0,
        help="predict call time as t (N/N')^p to skip slow calls before running them",
    )
    parser.add_argument("--per-particle-max-n", type=int, default=1024)
    options = parser.parse_args(argv)
    if options.quick:
        defaults = {"dtypes": ["float64"], "sizes": [64], "dims": [2], "seeds": 4}
        options.min_seconds = 0.0
    else:
        defaults = {
            "dtypes": ["float64", "float32"],
            "sizes": [64, 256, 1024, 4096],
            "dims": [1, 4],
            "seeds": 32,
        }
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    return options


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the markdown table and write the JSON and markdown files."""
    jax.config.update("jax_enable_x64", True)
    options = parse_arguments(argv)
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    resamplers = build_resamplers()
    if options.resamplers is not None:
        unknown = set(options.resamplers) - set(resamplers)
        if unknown:
            raise SystemExit(f"unknown resamplers {sorted(unknown)}; known: {sorted(resamplers)}")
        resamplers = {k: v for k, v in resamplers.items() if k in options.resamplers}

    results, checks, history = [], [], {}
    for dtype_name in options.dtypes:
        dtype = jnp.dtype(dtype_name)
        for d in options.dims:
            for n in sorted(options.sizes):
                log_weights, particles = gaussian_example(jax.random.key(0), n, d, dtype)
                args = (jax.random.key(1), log_weights, particles)
                rows = {}
                for name, resampler in resamplers.items():
                    row = benchmark_one(name, resampler, n, d, dtype, args, history, options)
                    rows[name] = row
                    print(
                        f"[{time.perf_counter() - started:6.0f} s] {dtype_name} d={d} N={n} "
                        f"{name}: fwd {_format(row.get('forward_ms'))} ms, fwd+grad "
                        f"{_format(row.get('gradient_ms'))} ms, rms "
                        f"{_format(row.get('rms_error'))} {row.get('reason', '')}",
                        file=sys.stderr,
                        flush=True,
                    )
                if dtype_name == "float64":
                    checks.extend(check_per_particle(rows, n, d))
                input_error = next((r for r in rows.values() if "input_rms_error" in r), None)
                if input_error is not None:
                    rows[INPUT_ROW] = {
                        "resampler": INPUT_ROW,
                        "n": n,
                        "d": d,
                        "dtype": dtype_name,
                        "status": "ok",
                        "rms_error": input_error["input_rms_error"],
                        "seeds": input_error["seeds"],
                    }
                for row in rows.values():
                    row.pop("outputs", None)
                    row.pop("input_rms_error", None)
                results.extend(rows.values())

    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python_version": platform.python_version(),
            "jax_version": jax.__version__,
            "quick": options.quick,
            "dtypes": options.dtypes,
            "sizes": options.sizes,
            "dims": options.dims,
            "repeats": options.repeats,
            "seeds": options.seeds,
            "max_call_seconds": options.max_call_seconds,
            "observation": OBSERVATION,
            "observation_variance": OBSERVATION_VARIANCE,
            "load_start": load_start,
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "total_seconds": time.perf_counter() - started,
        },
        "speed_ratios": speed_ratios(results),
        "checks": checks,
        "results": results,
    }
    table = markdown(report)
    print(table)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    options.out.with_suffix(".md").write_text(table)
    return report


if __name__ == "__main__":
    main()
