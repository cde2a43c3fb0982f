"""Scaling benchmark: what users feel (NUTS end to end), gradient memory and time against N.

Sections (choose with `--sections`):

* `nuts`: NUTS (300 warmup + 400 samples, one chain) on an AR(1)-plus-noise model, T = 30,
  with the diffusion particle-filter likelihood at several (N, K, dtype) settings, next to NUTS
  on the exact Kalman likelihood: wall time up to `get_samples()`, posterior means and SDs
  against the exact posterior (in exact-posterior SDs), divergences.
* `gradient`: `value_and_grad` of the filter log-likelihood on a linear-Gaussian model with
  d = 4, T = 100: XLA's compiled temporary memory for N in {256, ..., 16384} (read from the
  compiled executable, not run), and the measured time where `--max-run-particles` allows.
* `resampler`: the diffusion resampler alone, forward, d = 4, for N up to `--max-resampler-n`.

    python benchmarks/scaling.py                        # everything, default sizes
    python benchmarks/scaling.py --sections nuts --quick

Prints markdown and writes JSON (and the markdown beside it) under `benchmarks/results/`.
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

import numpyro_diffres as ndr

DEFAULT_OUT = Path(__file__).parent / "results" / "scaling.json"
TRUE = {"phi": 0.8, "q": 0.5, "r": 0.5}
NUTS_SETTINGS = [(256, 8, "float64"), (128, 8, "float64"), (64, 8, "float64"), (64, 4, "float32")]


def _ar1(phi, q, r):
    return ndr.StateSpaceModel(
        initial=dist.Normal(0.0, q / jnp.sqrt(1.0 - phi**2)),
        transition=lambda x, t: dist.Normal(phi * x, q),
        emission=lambda x, t: dist.Normal(x, r),
    )


def _priors():
    phi = numpyro.sample("phi", dist.Uniform(-0.98, 0.98))
    q = numpyro.sample("q", dist.LogNormal(jnp.log(0.5), 0.5))
    r = numpyro.sample("r", dist.LogNormal(jnp.log(0.5), 0.5))
    return phi, q, r


def _particle_model(observations, num_particles, num_steps):
    phi, q, r = _priors()
    ndr.particle_factor(
        "y",
        _ar1(phi, q, r),
        observations,
        num_particles=num_particles,
        resampler=ndr.resampling.diffusion(num_steps=num_steps),
    )


def _exact_model(observations):
    phi, q, r = _priors()
    one = jnp.eye(1, dtype=observations.dtype)
    params = ndr.LinearGaussianParams(
        jnp.zeros(1, observations.dtype),
        (q**2 / (1.0 - phi**2)) * one,
        phi * one,
        q**2 * one,
        one,
        r**2 * one,
    )
    numpyro.factor("y", ndr.kalman_log_likelihood(params, observations[:, None]))


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
    with jax.enable_x64(True):
        _, observations = ndr.simulate(jax.random.PRNGKey(0), _ar1(**TRUE), args.num_time_steps)
        exact, seconds, divergent, leapfrog = _run_nuts(_exact_model, observations, args)
        exact_mean = {k: float(v.mean()) for k, v in exact.items()}
        exact_sd = {k: float(v.std()) for k, v in exact.items()}
        rows.append(
            {"likelihood": "exact (Kalman)", "seconds": seconds, "divergent": divergent}
            | {"leapfrog_per_iteration": leapfrog}
            | {f"{k}_mean": exact_mean[k] for k in TRUE}
            | {f"{k}_sd": exact_sd[k] for k in TRUE}
        )
        print(f"exact: {seconds:.1f} s", flush=True)
    for num_particles, num_steps, dtype in args.nuts_settings:
        with jax.enable_x64(dtype == "float64"):
            data = jnp.asarray(np.asarray(observations), dtype)
            samples, seconds, divergent, leapfrog = _run_nuts(
                _particle_model, data, args, num_particles=num_particles, num_steps=num_steps
            )
        row = {
            "likelihood": f"diffusion N={num_particles} K={num_steps} {dtype}",
            "seconds": seconds,
            "divergent": divergent,
            "leapfrog_per_iteration": leapfrog,
        }
        for k in TRUE:
            mean, sd = float(samples[k].mean()), float(samples[k].std())
            row[f"{k}_mean"], row[f"{k}_sd"] = mean, sd
            row[f"{k}_mean_error_in_sd"] = (mean - exact_mean[k]) / exact_sd[k]
            row[f"{k}_sd_ratio"] = sd / exact_sd[k]
        rows.append(row)
        print(f"{row['likelihood']}: {seconds:.1f} s", flush=True)
    return rows


def _linear_gaussian_filter(num_particles, num_steps, dimension=4):
    observations = jnp.zeros((num_steps, dimension))

    def log_likelihood(phi):
        model = ndr.StateSpaceModel(
            initial=dist.Normal(jnp.zeros(dimension), 1.0).to_event(1),
            transition=lambda x, t: dist.Normal(phi * x, 1.0).to_event(1),
            emission=lambda x, t: dist.Normal(x, 0.5).to_event(1),
        )
        return ndr.particle_filter(
            jax.random.PRNGKey(0), model, observations, num_particles=num_particles
        ).log_likelihood

    return jax.jit(jax.value_and_grad(log_likelihood))


def _median_ms(function, *arguments, repeats):
    jax.block_until_ready(function(*arguments))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def gradient_section(args):
    """Compiled memory (and time where affordable) of value_and_grad of the filter."""
    rows = []
    with jax.enable_x64(True):
        for n in args.gradient_sizes:
            function = _linear_gaussian_filter(n, args.gradient_time_steps)
            compiled = function.lower(jnp.asarray(0.5)).compile()
            memory = compiled.memory_analysis()
            naive = args.gradient_time_steps * 8 * n * n * 8
            row = {
                "N": n,
                "T": args.gradient_time_steps,
                "temporary_MiB": memory.temp_size_in_bytes / 2**20,
                "naive_attention_storage_MiB": naive / 2**20,
                "value_and_grad_ms": None,
            }
            if n <= args.max_run_particles:
                row["value_and_grad_ms"] = _median_ms(compiled, jnp.asarray(0.5), repeats=3)
            rows.append(row)
            print(row, flush=True)
    return rows


def resampler_section(args):
    """Forward time of the diffusion resampler alone, d = 4, K = 8, float64."""
    rows = []
    resampler = ndr.resampling.diffusion()
    with jax.enable_x64(True):
        for n in args.resampler_sizes:
            if n > args.max_resampler_n:
                continue
            particles = jax.random.normal(jax.random.PRNGKey(0), (n, 4))
            log_weights = jax.random.normal(jax.random.PRNGKey(1), (n,))
            forward = jax.jit(lambda lw, x: resampler(jax.random.PRNGKey(2), lw, x)[0])
            rows.append(
                {"N": n, "forward_ms": _median_ms(forward, log_weights, particles, repeats=3)}
            )
            print(rows[-1], flush=True)
    return rows


def _markdown(report):
    lines = [
        "# Scaling benchmark",
        "",
        f"Run {report['date']} on {report['platform']} ({os.cpu_count()} CPUs), jax "
        f"{jax.__version__}; total {report['total_seconds']:.0f} s. Load average at start / "
        f"end: {report['load_start']} / {report['load_end']} (other processes share the CPUs: "
        "compare within this run only).",
        "",
    ]
    if report.get("nuts"):
        lines += [
            "## NUTS end to end (AR(1) plus noise)",
            "",
            f"T = {report['settings']['num_time_steps']}, {report['settings']['num_warmup']} "
            f"warmup + {report['settings']['num_samples']} samples, one chain, time up to "
            "`get_samples()` including compilation. Mean error in exact-posterior SDs and SD "
            "ratio against NUTS on the exact Kalman likelihood of the same data.",
            "",
            "| likelihood | seconds | leapfrog/iter | divergent | "
            + " | ".join(f"{k} mean err (SD) | {k} SD ratio" for k in TRUE)
            + " |",
            "|---|---:|---:|---:|" + "---:|" * (2 * len(TRUE)),
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
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "The exact row shows the exact posterior mean and SD in parentheses.", ""]
    if report.get("gradient"):
        lines += [
            "## value_and_grad of the filter: memory and time (d = 4, K = 8, float64)",
            "",
            "Temporary memory of XLA's compiled plan (`memory_analysis()`), against storing "
            "every attention matrix (T x K x N^2 x 8 bytes).",
            "",
            "| N | T | compiled temporaries MiB | naive storage MiB | value_and_grad ms |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in report["gradient"]:
            time_cell = (
                "-" if row["value_and_grad_ms"] is None else f"{row['value_and_grad_ms']:.0f}"
            )
            lines.append(
                f"| {row['N']} | {row['T']} | {row['temporary_MiB']:.1f} | "
                f"{row['naive_attention_storage_MiB']:.0f} | {time_cell} |"
            )
        lines.append("")
    if report.get("resampler"):
        lines += [
            "## Diffusion resampler alone, forward (d = 4, K = 8, float64)",
            "",
            "| N | forward ms |",
            "|---:|---:|",
        ]
        lines += [f"| {row['N']} | {row['forward_ms']:.1f} |" for row in report["resampler"]]
        lines.append("")
    return "\n".join(lines)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["nuts", "gradient", "resampler"],
        choices=["nuts", "gradient", "resampler"],
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--num-time-steps", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--gradient-time-steps", type=int, default=100)
    parser.add_argument("--gradient-sizes", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--max-run-particles", type=int, default=1024)
    parser.add_argument(
        "--resampler-sizes", nargs="+", type=int, default=[1024, 4096, 16384, 65536]
    )
    parser.add_argument("--max-resampler-n", type=int, default=16384)
    args = parser.parse_args(argv)
    args.nuts_settings = NUTS_SETTINGS
    if args.quick:
        args.num_time_steps, args.num_warmup, args.num_samples = 10, 20, 20
        args.nuts_settings = [(16, 4, "float64")]
        args.gradient_time_steps, args.gradient_sizes, args.max_run_particles = 5, [64, 256], 64
        args.resampler_sizes, args.max_resampler_n = [64, 256], 256
    return args


def main(argv=None):
    args = parse_arguments(argv)
    start = time.perf_counter()
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",) and not callable(v)},
    }
    if "nuts" in args.sections:
        report["nuts"] = nuts_section(args)
    if "gradient" in args.sections:
        report["gradient"] = gradient_section(args)
    if "resampler" in args.sections:
        report["resampler"] = resampler_section(args)
    report["total_seconds"] = time.perf_counter() - start
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    markdown = _markdown(report)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
