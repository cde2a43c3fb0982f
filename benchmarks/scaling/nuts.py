"""Scaling section `nuts`: NUTS end to end on the particle likelihood against the exact one."""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import load_average  # noqa: E402
from benchmarks.models import ar1, ar1_params  # noqa: E402
from benchmarks.scaling._shared import (  # noqa: E402
    TRUE,
    _ar1_observations,
)

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
        | {"leapfrog_per_iteration": leapfrog, "load": load_average()}
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
            "load": load_average(),
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
