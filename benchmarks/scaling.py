r"""Scaling benchmark: what users feel (NUTS end to end), gradient memory and time against N.

Sections (choose with `--sections`):

* `nuts`: NUTS (300 warmup + 400 samples, one chain) on an AR(1)-plus-noise model, T = 30,
  with the diffusion particle-filter likelihood at several (N, K, dtype) settings, next to NUTS
  on the exact Kalman likelihood: wall time up to `get_samples()`, posterior means and SDs
  against the exact posterior (in exact-posterior SDs), divergences, and whether the setting
  meets the target (under 60 s, means within 0.3 exact SD, SDs within 30%). A "mixed"
  setting runs NUTS in float64 with the filter's particles in float32. `--nuts-settings
  64,8,mixed --update` reruns only the named rows into the committed report.
* `gradient`: `value_and_grad` of the filter log-likelihood on a linear-Gaussian model with
  d = 4, T = 100, for diffusion, optimal-transport and stop-gradient(systematic) resampling:
  XLA's compiled temporary memory for N in {256, ..., 16384} (read from the compiled
  executable, not run), and the measured time where `--max-run-particles` and
  `--max-gradient-call-seconds` allow.
* `resampler`: the diffusion resampler alone, forward, d = 4, for N up to `--max-resampler-n`,
  with the attention's block size and its compiled memory.
* `accuracy`: resampled-mean error against forward time, diffusion (K in {4, 8, 16}) and
  optimal transport (epsilon in {0.1, 0.2, 0.4, 0.8}) at N in {1024, 4096, 8192}, on the
  conjugate Gaussian example of `benchmarks/resampling.py` (prior $N(0, I_d)$, likelihood
  $N(y; x, 0.5 I_d)$, exact posterior mean $y / 1.5$), and the comparison at equal error.
* `precision`: the filter log-likelihood and its gradient in float64, float32 (with the same
  noise, x64 enabled), mixed precision (`dtype=float32` particles, float64 densities) and
  float32 with x64 disabled, same keys and over several keys, for the AR(1) model of `nuts`
  and the linear-Gaussian model of `gradient`.

Every time is a median of jit-compiled calls after compilation (a call that takes more than
2 s is timed once, without a warm-up call). Where a call is predicted (from the largest smaller
N measured, as $t (N / N')^2$) to exceed its section's limit, it is not run and the row says
so; predicted times are labelled as estimates.

    python benchmarks/scaling.py                        # everything, default sizes
    python benchmarks/scaling.py --sections nuts --quick

Prints markdown and writes JSON (and the markdown beside it) under `benchmarks/results/`.
"""

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import OBSERVATION_VARIANCE, gaussian_example, posterior_mean  # noqa: E402
from benchmarks.models import ar1, ar1_params  # noqa: E402
from numpyro_diffres.resampling.attention import block_size  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "scaling.json"
TRUE = {"phi": 0.8, "q": 0.5, "r": 0.5}
# (N, K, precision): "float64" and "float32" set JAX's x64 mode; "mixed" is a float64 program
# (x64 enabled, float64 parameters and NUTS) whose filter particles are float32
# (`particle_factor(dtype=jnp.float32)`).
NUTS_SETTINGS = [
    (256, 8, "float64"),
    (128, 8, "float64"),
    (64, 8, "float64"),
    (64, 8, "mixed"),
    (128, 4, "float32"),
    (64, 4, "float32"),
]
NUTS_PRECISIONS = ("float64", "float32", "mixed")
# The NUTS target: under this many seconds, posterior means within MEAN_TOLERANCE exact
# posterior SDs of the exact ones and SDs within SD_TOLERANCE (relative) of the exact ones.
TARGET_SECONDS = 60.0
MEAN_TOLERANCE = 0.3
SD_TOLERANCE = 0.3
# A call slower than this is timed once, without a warm-up call.
SINGLE_CALL_SECONDS = 2.0


def _priors():
    phi = numpyro.sample("phi", dist.Uniform(-0.98, 0.98))
    q = numpyro.sample("q", dist.LogNormal(jnp.log(0.5), 0.5))
    r = numpyro.sample("r", dist.LogNormal(jnp.log(0.5), 0.5))
    return phi, q, r


def _particle_model(observations, num_particles, num_steps, particle_dtype=None):
    phi, q, r = _priors()
    ndr.particle_factor(
        "y",
        ar1(phi, q, r),
        observations,
        num_particles=num_particles,
        resampler=ndr.resampling.diffusion(num_steps=num_steps),
        dtype=particle_dtype,
    )


def _exact_model(observations):
    phi, q, r = _priors()
    params = ar1_params(phi, q, r, dtype=observations.dtype)
    numpyro.factor("y", ndr.kalman_log_likelihood(params, observations[:, None]))


def _ar1_observations(num_time_steps):
    with jax.enable_x64(True):
        _, observations = ndr.simulate(jax.random.PRNGKey(0), ar1(**TRUE), num_time_steps)
    return np.asarray(observations)


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _run_nuts(model, observations, args, **kwargs):
    mcmc = MCMC(
        NUTS(model),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(1), observations, extra_fields=("num_steps",), **kwargs)
    samples = jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    return samples, seconds, int(extra["diverging"].sum()), float(extra["num_steps"].mean())


def nuts_section(args):
    """End-to-end NUTS: diffusion filter settings against the exact likelihood."""
    rows = []
    observations = _ar1_observations(args.num_time_steps)
    with jax.enable_x64(True):
        exact, seconds, divergent, leapfrog = _run_nuts(
            _exact_model, jnp.asarray(observations), args
        )
        exact_mean = {k: float(v.mean()) for k, v in exact.items()}
        exact_sd = {k: float(v.std()) for k, v in exact.items()}
    rows.append(
        {"likelihood": "exact (Kalman)", "seconds": seconds, "divergent": divergent}
        | {"leapfrog_per_iteration": leapfrog, "load": _load()}
        | {f"{k}_mean": exact_mean[k] for k in TRUE}
        | {f"{k}_sd": exact_sd[k] for k in TRUE}
    )
    print(f"exact: {seconds:.1f} s", flush=True)
    for num_particles, num_steps, dtype in args.nuts_settings:
        mixed = dtype == "mixed"
        with jax.enable_x64(dtype != "float32"):
            data = jnp.asarray(observations, "float64" if mixed else dtype)
            samples, seconds, divergent, leapfrog = _run_nuts(
                _particle_model,
                data,
                args,
                num_particles=num_particles,
                num_steps=num_steps,
                particle_dtype=jnp.float32 if mixed else None,
            )
            sample_dtype = str(samples["phi"].dtype)
        label = "float64, float32 particles" if mixed else dtype
        row = {
            "likelihood": f"diffusion N={num_particles} K={num_steps} {label}",
            "num_particles": num_particles,
            "num_steps": num_steps,
            "dtype": dtype,
            "sample_dtype": sample_dtype,
            "seconds": seconds,
            "divergent": divergent,
            "leapfrog_per_iteration": leapfrog,
            "load": _load(),
        }
        for k in TRUE:
            mean, sd = float(samples[k].mean()), float(samples[k].std())
            row[f"{k}_mean"], row[f"{k}_sd"] = mean, sd
            row[f"{k}_mean_error_in_sd"] = (mean - exact_mean[k]) / exact_sd[k]
            row[f"{k}_sd_ratio"] = sd / exact_sd[k]
        row["accurate"] = all(
            abs(row[f"{k}_mean_error_in_sd"]) <= MEAN_TOLERANCE
            and abs(row[f"{k}_sd_ratio"] - 1.0) <= SD_TOLERANCE
            for k in TRUE
        )
        row["meets_target"] = row["accurate"] and seconds < TARGET_SECONDS
        rows.append(row)
        print(f"{row['likelihood']}: {seconds:.1f} s", flush=True)
    return rows


def _gradient_resamplers(args):
    resampling = ndr.resampling
    return {
        "diffusion": resampling.diffusion(),
        "optimal_transport": resampling.optimal_transport(args.ot_epsilon),
        "stop_gradient": resampling.stop_gradient(resampling.systematic()),
    }


def _linear_gaussian_log_likelihood(num_particles, num_steps, resampler, dimension=4, dtype=None):
    """`(key, phi) -> log-likelihood` of a d-dimensional linear-Gaussian model (zero data).

    `dtype` is the filter's particle dtype (None: that of `phi`).
    """

    def log_likelihood(key, phi):
        observations = jnp.zeros((num_steps, dimension), jnp.asarray(phi).dtype)
        # Constants in phi's dtype: NumPyro turns a Python float into a default-precision
        # array, which with x64 enabled would make a float32 model evaluate in float64.
        one, half = jnp.asarray(1.0, observations.dtype), jnp.asarray(0.5, observations.dtype)
        model = ndr.StateSpaceModel(
            initial=dist.Normal(jnp.zeros(dimension, observations.dtype), one).to_event(1),
            transition=lambda x, t: dist.Normal(phi * x, one).to_event(1),
            emission=lambda x, t: dist.Normal(x, half).to_event(1),
        )
        return ndr.particle_filter(
            key,
            model,
            observations,
            num_particles=num_particles,
            resampler=resampler,
            dtype=dtype,
        ).log_likelihood

    return log_likelihood


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


def _predicted(history, key, n):
    """Seconds per call extrapolated as t (N / N')^2 from the largest smaller N measured."""
    if key not in history:
        return None, None
    previous_n, seconds = history[key]
    return seconds * (n / previous_n) ** 2, previous_n


def gradient_section(args):
    """Compiled memory (and time where affordable) of value_and_grad of the filter."""
    rows, history = [], {}
    with jax.enable_x64(True):
        phi = jnp.asarray(0.5, jnp.float64)
        for method, resampler in _gradient_resamplers(args).items():
            for n in args.gradient_sizes:
                log_likelihood = _linear_gaussian_log_likelihood(
                    n, args.gradient_time_steps, resampler
                )
                function = jax.jit(
                    jax.value_and_grad(functools.partial(log_likelihood, jax.random.PRNGKey(0)))
                )
                start = time.perf_counter()
                compiled = function.lower(phi).compile()
                compile_seconds = time.perf_counter() - start
                memory = compiled.memory_analysis()
                row = {
                    "method": method,
                    "N": n,
                    "T": args.gradient_time_steps,
                    "temporary_MiB": memory.temp_size_in_bytes / 2**20,
                    "compile_s": compile_seconds,
                    "naive_attention_storage_MiB": (
                        args.gradient_time_steps * 8 * n * n * 8 / 2**20
                        if method == "diffusion"
                        else None
                    ),
                    "value_and_grad_ms": None,
                    "runs": 0,
                    "note": "",
                }
                predicted, previous_n = _predicted(history, method, n)
                if n > args.max_run_particles:
                    row["note"] = (
                        f"compiled only (N > {args.max_run_particles}, --max-run-particles)"
                    )
                elif predicted is not None and predicted > args.max_gradient_call_seconds:
                    row["note"] = (
                        f"compiled only: estimated {predicted:.0f} s per call from N={previous_n} "
                        f"(N^2 scaling; > {args.max_gradient_call_seconds:.0f} s)"
                    )
                    row["estimated_s"] = predicted
                else:
                    seconds, row["runs"] = _time_calls(compiled, phi, repeats=args.repeats)
                    row["value_and_grad_ms"] = 1e3 * seconds
                    history[method] = (n, seconds)
                rows.append(row)
                print(row, flush=True)
    return rows


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


PRECISION_MODELS = ("ar1", "linear_gaussian")
PRECISION_MODES = {
    # name: (x64 enabled, dtype of parameters and data, filter `dtype`)
    "float64": (True, "float64", None),
    "float32, same noise": (True, "float32", "float32"),
    "mixed: float32 particles, float64 densities": (True, "float64", "float32"),
    "float32, x64 disabled": (False, "float32", None),
}


def precision_section(args):
    """Filter log-likelihood in float64, float32 and mixed precision: same key, and over keys.

    With x64 enabled every random draw (NumPyro's samplers and the resampler's) is made in
    float64, and `particle_filter(dtype=float32)` rounds the states: the float32 run then uses
    the float64 run's noise, so their same-key difference is rounding error alone. With x64
    disabled float32 draws come from other random bits: that run differs by Monte Carlo noise.
    """
    observations = _ar1_observations(args.num_time_steps)
    n_ar1, k_ar1 = args.precision_ar1
    n_lg = args.precision_linear_gaussian_particles

    def ar1_case(dtype, filter_dtype):
        data = jnp.asarray(observations, dtype)
        resampler = ndr.resampling.diffusion(num_steps=k_ar1)

        def log_likelihood(key, scale):
            model = ar1(scale * TRUE["phi"], *(jnp.asarray(TRUE[k], dtype) for k in ("q", "r")))
            return ndr.particle_filter(
                key,
                model,
                data,
                num_particles=n_ar1,
                resampler=resampler,
                dtype=filter_dtype,
            ).log_likelihood

        return log_likelihood

    def linear_gaussian(dtype, filter_dtype):
        log_likelihood = _linear_gaussian_log_likelihood(
            n_lg, args.gradient_time_steps, ndr.resampling.diffusion(), dtype=filter_dtype
        )
        return lambda key, scale: log_likelihood(key, 0.5 * scale)

    models = {
        f"AR(1) of `nuts` at the true parameters, T={args.num_time_steps}, N={n_ar1}, "
        f"K={k_ar1}": ar1_case,
        f"linear-Gaussian of `gradient`, d=4, T={args.gradient_time_steps}, N={n_lg}, K=8, "
        "phi=0.5": linear_gaussian,
    }
    models = {
        name: build
        for (name, build), short in zip(models.items(), PRECISION_MODELS, strict=True)
        if short in args.precision_models
    }
    rows = []
    for name, build in models.items():
        values, gradients = {}, {}
        for mode, (x64, dtype, filter_dtype) in PRECISION_MODES.items():
            with jax.enable_x64(x64):
                scale = jnp.asarray(1.0, dtype)
                function = jax.jit(jax.value_and_grad(build(dtype, filter_dtype), argnums=1))
                results = [
                    function(jax.random.PRNGKey(s), scale) for s in range(args.precision_keys)
                ]
                assert all(str(r[0].dtype) == dtype for r in results), (mode, results[0])
                # Wait for every queued call before timing (dispatch is asynchronous).
                values[mode] = np.array([float(r[0]) for r in results])
                gradients[mode] = np.array([float(r[1]) for r in results])
                seconds, _ = _time_calls(function, jax.random.PRNGKey(0), scale, repeats=5)
                row = {"model": name, "mode": mode, "keys": len(results)}
                row |= {"value_and_grad_ms": 1e3 * seconds, "load": _load()}
                rows.append(row)
        reference, reference_gradient = values["float64"], gradients["float64"]
        for row in rows[-len(PRECISION_MODES) :]:
            value, gradient = values[row["mode"]], gradients[row["mode"]]
            standard_error = math.sqrt((value.var(ddof=1) + reference.var(ddof=1)) / len(value))
            relative = np.abs(value / reference - 1)
            gradient_relative = np.abs(gradient / reference_gradient - 1)
            row |= {
                "mean": float(value.mean()),
                "sd": float(value.std(ddof=1)),
                "max_same_key_relative_difference": float(relative.max()),
                "median_same_key_relative_difference": float(np.median(relative)),
                "max_same_key_gradient_relative_difference": float(gradient_relative.max()),
                "mean_difference_in_standard_errors": (
                    float((value.mean() - reference.mean()) / standard_error)
                    if row["mode"] != "float64"
                    else 0.0
                ),
            }
            print(row, flush=True)
    return rows


def _merge_rows(old_rows, new_rows, date):
    """`old_rows` with the rows of the same likelihood replaced by `new_rows` (dated)."""
    new = {row["likelihood"]: row | {"date": date} for row in new_rows}
    merged = [new.pop(row["likelihood"], row) for row in old_rows]
    return merged + list(new.values())


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def _nuts_markdown(report):
    settings = report["settings"]
    lines = [
        "## NUTS end to end (AR(1) plus noise)",
        "",
        f"T = {settings['num_time_steps']}, {settings['num_warmup']} warmup + "
        f"{settings['num_samples']} samples, one chain, time up to `get_samples()` including "
        "compilation. Mean error in exact-posterior SDs and SD ratio against NUTS on the exact "
        "Kalman likelihood of the same data. Target: under "
        f"{TARGET_SECONDS:.0f} s with every mean error within {MEAN_TOLERANCE} and every SD "
        f"ratio within 1 +/- {SD_TOLERANCE}. The load column is the 1-minute load average "
        "when the row finished.",
        "",
        "| likelihood | seconds | leapfrog/iter | divergent | "
        + " | ".join(f"{k} mean err (SD) | {k} SD ratio" for k in TRUE)
        + " | target met | load |",
        "|---|---:|---:|---:|" + "---:|" * (2 * len(TRUE)) + "---|---:|",
    ]
    for row in report["nuts"]:
        cells = [
            row["likelihood"],
            f"{row['seconds']:.1f}",
            f"{row['leapfrog_per_iteration']:.1f}",
            str(row["divergent"]),
        ]
        for k in TRUE:
            if f"{k}_mean_error_in_sd" in row:
                cells += [f"{row[f'{k}_mean_error_in_sd']:+.2f}", f"{row[f'{k}_sd_ratio']:.2f}"]
            else:
                cells += [f"({row[f'{k}_mean']:.3f})", f"({row[f'{k}_sd']:.3f})"]
        if "meets_target" not in row:
            cells.append("")
        elif row["meets_target"]:
            cells.append("yes")
        else:
            reasons = [] if row["accurate"] else ["accuracy"]
            reasons += [] if row["seconds"] < TARGET_SECONDS else ["time"]
            cells.append(f"no ({', '.join(reasons)})")
        cells.append(f"{row['load'][0]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The exact row shows the exact posterior mean and SD in parentheses.", ""]
    return lines


def _gradient_markdown(report):
    lines = [
        "## value_and_grad of the filter: memory and time (d = 4, float64)",
        "",
        f"Linear-Gaussian model, T = {report['settings']['gradient_time_steps']}; diffusion with "
        "K = 8, optimal transport with epsilon = "
        f"{report['settings']['ot_epsilon']} (implicit gradient), stop-gradient over systematic "
        "resampling. Temporary memory of XLA's compiled plan (`memory_analysis()`); for "
        "diffusion against storing every attention matrix (T x K x N^2 x 8 bytes). Times: see "
        "the runs column (1 = a single call after compilation); '-' = compiled only, the note "
        "says why.",
        "",
        "| resampler | N | compiled temporaries MiB | naive storage MiB | value_and_grad ms "
        "| runs | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["gradient"]:
        lines.append(
            f"| {row['method']} | {row['N']} | {row['temporary_MiB']:.1f} | "
            f"{_cell(row['naive_attention_storage_MiB'], '.0f')} | "
            f"{_cell(row['value_and_grad_ms'], '.0f')} | {row['runs']} | {row['note']} |"
        )
    lines.append("")
    return lines


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


def _precision_markdown(report):
    lines = [
        "## float32 against float64 log-likelihood",
        "",
        "Each model is run in four ways with the same keys. `float64`: x64 enabled, everything "
        "in float64 (the reference). `float32, same noise`: x64 enabled, parameters and data "
        "in float32 and `particle_filter(dtype=jnp.float32)`; every random draw is made in "
        "float64 and rounded, so this run uses the reference's noise and its difference is "
        "the rounding error of single precision. `mixed`: float64 parameters and data, "
        "`dtype=jnp.float32` (states and resampler in float32, densities and weights in "
        "float64), what a float64 NUTS run can use. `float32, x64 disabled`: how a float32 "
        "program runs; its draws come from other random bits, so it differs from the "
        "reference by Monte Carlo noise (compare its mean in standard errors). Relative "
        "differences are per key against the float64 run, for the log-likelihood and for its "
        "derivative in a scale of the transition coefficient; `value_and_grad` is timed at "
        "key 0.",
        "",
        "| model | run | keys | mean | SD over keys | same key: max (median) relative "
        "difference | same key: max gradient relative difference | mean difference in SE | "
        "value_and_grad ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["precision"]:
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['keys']} | {row['mean']:.3f} | "
            f"{row['sd']:.3f} | {row['max_same_key_relative_difference']:.1e} "
            f"({row['median_same_key_relative_difference']:.1e}) | "
            f"{row['max_same_key_gradient_relative_difference']:.1e} | "
            f"{row['mean_difference_in_standard_errors']:+.2f} | "
            f"{row['value_and_grad_ms']:.1f} |"
        )
    lines.append("")
    return lines


def _markdown(report):
    loads = ", ".join(
        f"{section} {load[0]:.1f}" for section, load in report["section_loads"].items()
    )
    lines = [
        "# Scaling benchmark",
        "",
        f"Run {report['date']} on {report['platform']} ({os.cpu_count()} CPUs), jax "
        f"{jax.__version__}; total {report['total_seconds']:.0f} s. Load average (1, 5, 15 "
        f"min) at start / end: {report['load_start']} / {report['load_end']}; 1-minute load "
        f"when each section started: {loads}. Other processes share the CPUs: compare within "
        "this run only.",
        "",
    ]
    for rerun in report.get("reruns", []):
        lines += [
            f"Section{'s' if len(rerun['sections']) > 1 else ''} "
            f"{', '.join(rerun['sections'])}"
            + (
                f" (NUTS rows {', '.join(rerun['nuts_rows'])}; NUTS on the exact likelihood "
                f"took {rerun['exact_seconds']:.1f} s in that run)"
                if rerun.get("nuts_rows")
                else ""
            )
            + f" rerun {rerun['date']} ({rerun['seconds']:.0f} s, "
            f"load {rerun['load_start']} / {rerun['load_end']}) with the code of that date; the "
            f"other {'rows and ' if rerun.get('nuts_rows') else ''}sections are from the run "
            "above.",
            "",
        ]
    if report.get("cuts"):
        lines += ["What this run left out, and why:", ""]
        lines += [f"- {cut}" for cut in report["cuts"]]
        lines.append("")
    if report.get("nuts"):
        lines += _nuts_markdown(report)
    if report.get("gradient"):
        lines += _gradient_markdown(report)
    if report.get("resampler"):
        lines += _resampler_markdown(report)
    if report.get("accuracy"):
        lines += _accuracy_markdown(report, report["settings"]["verdict_min_n"])
    if report.get("precision"):
        lines += _precision_markdown(report)
    return "\n".join(lines)


def _cuts(report):
    """One line per row that was not (fully) measured, from the notes the sections left."""
    cuts = []
    for row in report.get("gradient", []):
        if row["value_and_grad_ms"] is None:
            cuts.append(f"gradient, {row['method']}, N={row['N']}: {row['note']}")
    for row in report.get("resampler", []):
        if row.get("forward_ms") is None:
            cuts.append(f"resampler, N={row['N']}: {row['note']}")
    for row in report.get("accuracy", {}).get("rows", []):
        if "rms_error" not in row:
            cuts.append(f"accuracy, {row['method']} {row['setting']}, N={row['N']}: {row['note']}")
    return cuts


SECTIONS = {
    "nuts": nuts_section,
    "gradient": gradient_section,
    "resampler": resampler_section,
    "accuracy": accuracy_section,
    "precision": precision_section,
}


def _nuts_setting(text, parser):
    """`"N,K,PRECISION"` -> `(N, K, PRECISION)`, or a usage error saying what is wrong."""
    parts = text.split(",")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        parser.error(f"--nuts-settings takes N,K,PRECISION such as 64,8,mixed; got {text!r}.")
    if parts[2] not in NUTS_PRECISIONS:
        parser.error(f"--nuts-settings precision must be one of {NUTS_PRECISIONS}; got {text!r}.")
    return int(parts[0]), int(parts[1]), parts[2]


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun only --sections, keeping the other sections of the report in --out",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up")
    parser.add_argument(
        "--nuts-settings",
        dest="nuts_setting_text",
        nargs="+",
        default=None,
        metavar="N,K,PRECISION",
        help=f"NUTS settings to run, PRECISION one of {NUTS_PRECISIONS}; with --update only "
        "these rows are replaced (the exact row is kept)",
    )
    parser.add_argument("--num-time-steps", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--gradient-time-steps", type=int, default=100)
    parser.add_argument("--gradient-sizes", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--max-run-particles", type=int, default=16384)
    parser.add_argument("--max-gradient-call-seconds", type=float, default=60.0)
    parser.add_argument("--ot-epsilon", type=float, default=0.5)
    parser.add_argument(
        "--resampler-sizes", nargs="+", type=int, default=[1024, 4096, 16384, 65536]
    )
    parser.add_argument("--max-resampler-n", type=int, default=65536)
    parser.add_argument("--max-resampler-call-seconds", type=float, default=300.0)
    parser.add_argument("--accuracy-sizes", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--accuracy-num-steps", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--accuracy-epsilons", nargs="+", type=float, default=[0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--accuracy-seeds", type=int, default=4)
    parser.add_argument("--accuracy-dimension", type=int, default=4)
    parser.add_argument(
        "--max-accuracy-seconds",
        type=float,
        default=150.0,
        help="skip a setting whose estimated time over all seeds is larger",
    )
    parser.add_argument("--verdict-min-n", type=int, default=4096)
    parser.add_argument("--precision-keys", type=int, default=16)
    parser.add_argument("--precision-ar1", nargs=2, type=int, default=[64, 4], help="N K")
    parser.add_argument("--precision-linear-gaussian-particles", type=int, default=256)
    parser.add_argument(
        "--precision-models",
        nargs="+",
        default=list(PRECISION_MODELS),
        choices=PRECISION_MODELS,
        help="models of the precision section",
    )
    args = parser.parse_args(argv)
    if args.update and not args.out.exists():
        parser.error(f"--update keeps the other sections of {args.out}, which does not exist.")
    args.nuts_settings = NUTS_SETTINGS
    if args.nuts_setting_text:
        args.nuts_settings = [_nuts_setting(text, parser) for text in args.nuts_setting_text]
    if args.quick:
        # Smoke test: compiling, not running, takes the time, so one configuration per
        # code path: two NUTS rows (float32, mixed) beside the exact one, one N per gradient
        # method (256: its temporary memory is checked), one resampler N run and one only
        # listed, one diffusion and one OT accuracy setting, the AR(1) precision model.
        args.num_time_steps, args.num_warmup, args.num_samples = 5, 10, 10
        quick_nuts = [(8, 2, "float32"), (8, 2, "mixed")]
        args.nuts_settings = args.nuts_settings if args.nuts_setting_text else quick_nuts
        args.gradient_time_steps, args.gradient_sizes, args.max_run_particles = 5, [256], 256
        args.resampler_sizes, args.max_resampler_n = [64, 128], 64
        args.accuracy_sizes, args.accuracy_num_steps = [64], [2]
        args.accuracy_epsilons, args.accuracy_seeds, args.verdict_min_n = [0.8], 2, 64
        args.precision_keys, args.precision_ar1 = 2, [8, 2]
        args.precision_linear_gaussian_particles = 32
        args.precision_models = ["ar1"]
    return args


def main(argv=None):
    args = parse_arguments(argv)
    start = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    settings = {k: v for k, v in vars(args).items() if k not in ("out",) and not callable(v)}
    load_start = _load()
    # Rerunning named NUTS settings into a committed report replaces only their rows.
    merge_nuts = args.update and "nuts" in args.sections and bool(args.nuts_setting_text)
    if args.update:
        # Keep the other sections of the committed run; record when and how these were rerun.
        report = json.loads(args.out.read_text())
        if merge_nuts:
            for name in ("num_time_steps", "num_warmup", "num_samples"):
                if report["settings"][name] != getattr(args, name):
                    raise SystemExit(
                        f"--update of NUTS rows needs the report's {name}="
                        f"{report['settings'][name]} (got {getattr(args, name)}): rows of "
                        "one table must share their settings."
                    )
    else:
        report = {"date": date, "platform": platform.platform(), "load_start": load_start}
        report |= {"settings": settings, "section_loads": {}}
    for name in args.sections:
        report["section_loads"][name] = _load()
        rows = SECTIONS[name](args)
        if merge_nuts and name == "nuts":
            # Only the named settings were rerun: they replace their rows. The exact row stays
            # (the exact posterior is the same draw for the same seed; its time is noted).
            exact_seconds = rows[0]["seconds"]
            rows = _merge_rows(report["nuts"], rows[1:], date)
        report[name] = rows
    if args.update:
        rerun = {"sections": args.sections, "date": date, "platform": platform.platform()}
        if merge_nuts:
            rerun["nuts_rows"] = [f"N={n} K={k} {p}" for n, k, p in args.nuts_settings]
            rerun["exact_seconds"] = exact_seconds
        rerun |= {"seconds": time.perf_counter() - start, "settings": settings}
        rerun |= {"load_start": load_start, "load_end": _load()}
        report.setdefault("reruns", []).append(rerun)
    else:
        report["total_seconds"] = time.perf_counter() - start
        report["load_end"] = _load()
    report["cuts"] = _cuts(report)
    markdown = _markdown(report)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
