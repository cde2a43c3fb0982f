"""Scaling section `gradient`: compiled gradient memory and time against N."""

import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks.scaling._shared import (  # noqa: E402
    _cell,
    _time_calls,
)


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
