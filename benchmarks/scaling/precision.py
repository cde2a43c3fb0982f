"""Scaling section `precision`: float32 and mixed precision against float64."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import load_average  # noqa: E402
from benchmarks.models import ar1  # noqa: E402
from benchmarks.scaling._shared import (  # noqa: E402
    TRUE,
    _ar1_observations,
    _time_calls,
)
from benchmarks.scaling.gradient import _linear_gaussian_log_likelihood  # noqa: E402

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
                function = function.lower(jax.random.PRNGKey(0), scale).compile()
                results = [
                    function(jax.random.PRNGKey(s), scale) for s in range(args.precision_keys)
                ]
                assert all(str(r[0].dtype) == dtype for r in results), (mode, results[0])
                # Wait for every queued call before timing (dispatch is asynchronous).
                values[mode] = np.array([float(r[0]) for r in results])
                gradients[mode] = np.array([float(r[1]) for r in results])
                seconds, _ = _time_calls(function, jax.random.PRNGKey(0), scale, repeats=5)
                row = {"model": name, "mode": mode, "keys": len(results)}
                row |= {"value_and_grad_ms": 1e3 * seconds, "load": load_average()}
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
