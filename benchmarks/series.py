"""Many series in one model: `particle_factor` under `numpyro.plate("series", S)`.

The hierarchical AR(1)-plus-noise model of `benchmarks/models.py` (`series_*`): S series with a
shared coefficient `phi` and emission scale `exp(log_r)`, series-level process-noise scales
`q_s = exp(mu + tau z_s)` (non-centred partial pooling), guided (locally optimal) proposal,
diffusion resampling with K = 4, float32 particles. Measured, by the shared protocol of
`benchmarks/_common.py`:

1. compile time of the model's potential and its gradient for S = 1, 10, 100 (one trace
   whatever S: it should be flat in S) and the run time per value-and-gradient (linear in S);
2. NUTS (300 warm-up + 400 draws, one chain) through `particle_factor` for S = 20, T = 50,
   N = 64, next to NUTS on the exact likelihood (`kalman_log_likelihood` vmapped over series,
   float64): wall times, and the particle posterior's mean shift (in exact posterior SDs) and
   SD ratio for the statics.

    python benchmarks/series.py                 # full run, writes benchmarks/results/series.*
    python benchmarks/series.py --quick --out /tmp/s.json   # smoke test
"""

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS, init_to_value
from numpyro.infer.util import log_density, potential_energy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
from benchmarks._common import (  # noqa: E402
    finish_metadata,
    load_line,
    markdown_table,
    run_metadata,
    time_call,
    write_report,
)
from benchmarks.models import SERIES_GLOBALS as GLOBALS  # noqa: E402
from benchmarks.models import series_exact_model as exact_model  # noqa: E402
from benchmarks.models import (  # noqa: E402
    series_particle_model as particle_model,  # guided, diffusion(num_steps=4), float32
)
from benchmarks.models import simulate_series  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "series.json"


def potential_timing(num_series: int, num_steps: int, num_particles: int) -> dict:
    """Compile time and median time of one value-and-gradient of the potential."""
    observations = jnp.asarray(simulate_series(num_series, num_steps), jnp.float32)
    # The potential NUTS uses (`initialize_model`'s `potential_fn`), at unconstrained zeros:
    # finding a random valid start runs the model op by op, which compiles every operation
    # separately and took longer than compiling the potential itself.
    potential = functools.partial(
        potential_energy, particle_model, (observations, num_particles), {}
    )
    params = {name: jnp.zeros((), jnp.float32) for name in GLOBALS}
    params["z"] = jnp.zeros(num_series, jnp.float32)
    timing = time_call(jax.value_and_grad(potential), (params,), repeats=3)
    value = float(timing.output[0])
    return {
        "num_series": num_series,
        "compile_seconds": timing.compile,
        "gradient_seconds": timing.median,
        "runs": timing.runs,
        "potential_finite": math.isfinite(value),
    }


def run_nuts(
    model, observations, args: tuple, num_warmup: int, num_samples: int, seed: int, **kwargs
):
    mcmc = MCMC(
        NUTS(model, **kwargs),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=1,
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), observations, *args, extra_fields=("num_steps", "diverging"))
    samples = jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    return (
        {name: np.asarray(value) for name, value in samples.items()},
        {
            "seconds": seconds,
            "mean_leapfrog_steps": float(np.mean(extra["num_steps"])),
            "divergences": int(np.sum(extra["diverging"])),
        },
        mcmc,
    )


def nuts_comparison(options: argparse.Namespace, num_particles: int) -> dict:
    data = simulate_series(options.nuts_series, options.num_steps, seed=0)
    with jax.enable_x64(True):
        exact, exact_run, exact_mcmc = run_nuts(
            exact_model, jnp.asarray(data), (), options.num_warmup, options.num_samples, seed=1
        )
        mass = exact_mcmc.last_state.adapt_state.inverse_mass_matrix
        mass = {key: np.asarray(value, np.float32).reshape(-1) for key, value in mass.items()}
    warm = {}
    if options.warm_start:
        # The machine is shared: start at the exact posterior mean with the exact run's
        # diagonal mass matrix, adapting only the step size (the chain still samples the
        # fixed-noise particle posterior).
        start = {name: jnp.asarray(exact[name].mean(0), jnp.float32) for name in exact}
        warm = {
            "inverse_mass_matrix": mass,
            "adapt_mass_matrix": False,
            "init_strategy": init_to_value(values=start),
        }
    particle, particle_run, _ = run_nuts(
        particle_model,
        jnp.asarray(data, jnp.float32),
        (num_particles,),
        options.particle_warmup,
        options.num_samples,
        seed=2,
        **warm,
    )
    rows = []
    columns = [(name, particle[name], exact[name]) for name in GLOBALS]
    columns += [
        (f"z[{s}]", particle["z"][:, s], exact["z"][:, s]) for s in range(options.nuts_series)
    ]
    for name, draws, exact_draws in columns:
        exact_sd = float(exact_draws.std())
        rows.append(
            {
                "parameter": name,
                "particle_mean": float(draws.mean()),
                "exact_mean": float(exact_draws.mean()),
                "mean_shift_in_sd": float((draws.mean() - exact_draws.mean()) / exact_sd),
                "sd_ratio": float(draws.std() / exact_sd),
                "particle_ess": float(effective_sample_size(np.asarray(draws)[None])),
            }
        )
    shifts = [abs(row["mean_shift_in_sd"]) for row in rows]
    ratios = [row["sd_ratio"] for row in rows]
    return {
        "num_particles": num_particles,
        "exact": exact_run,
        "particle": particle_run,
        "parameters": rows,
        "max_abs_shift": max(shifts),
        "min_sd_ratio": min(ratios),
        "max_sd_ratio": max(ratios),
        "warm_start": options.warm_start,
        "particle_warmup": options.particle_warmup,
    }


def gradient_bias(options: argparse.Namespace) -> dict:
    """Error of the fixed-noise log-likelihood and its gradient against the exact ones.

    At `options.bias_point` (the exact posterior mean of the NUTS run's data), for each N
    in `options.bias_particles`, over `options.bias_keys` keys: the mean (the bias, which NUTS
    with any key inherits) and the SD over keys (what one fixed key adds) of the error of the
    summed log-likelihood and of its gradient in the shared parameters. A shift of the
    posterior mean is about posterior variance times the gradient error.
    """
    data = simulate_series(options.nuts_series, options.num_steps, seed=0)
    point = options.bias_point
    names = ("phi", "log_r", "mu")

    def log_likelihood(model, observations, args, shared, dtype):
        values = {name: jnp.asarray(point[name], dtype) for name in GLOBALS}
        values.update(shared)
        values["z"] = jnp.asarray(point["z"], dtype)
        # The whole model's log-density: the priors' part is the same in both models and
        # cancels in the error.
        return log_density(model, (observations, *args), {}, values)[0]

    with jax.enable_x64(True):
        shared = {name: jnp.asarray(point[name], jnp.float64) for name in names}
        exact_value, exact_grad = jax.value_and_grad(
            lambda shared: log_likelihood(exact_model, jnp.asarray(data), (), shared, jnp.float64)
        )(shared)
        exact_value = float(exact_value)
        exact_grad = {name: float(exact_grad[name]) for name in names}
    observations = jnp.asarray(data, jnp.float32)
    shared = {name: jnp.asarray(point[name], jnp.float32) for name in names}
    rows = []
    for num_particles in options.bias_particles:

        def value_and_grad(shared, key, num_particles=num_particles):
            return jax.value_and_grad(
                lambda shared: log_likelihood(
                    handlers.seed(particle_model, key),
                    observations,
                    (num_particles,),
                    shared,
                    jnp.float32,
                )
            )(shared)

        value_and_grad = jax.jit(value_and_grad)
        values, grads = [], {name: [] for name in names}
        for seed in range(options.bias_keys):
            value, grad = value_and_grad(shared, jax.random.PRNGKey(seed))
            values.append(float(value) - exact_value)
            for name in names:
                grads[name].append(float(grad[name]) - exact_grad[name])
        row = {
            "num_particles": num_particles,
            "keys": options.bias_keys,
            "value_error_mean": float(np.mean(values)),
            "value_error_sd": float(np.std(values)),
        }
        for name in names:
            row[f"{name}_grad_error_mean"] = float(np.mean(grads[name]))
            row[f"{name}_grad_error_sd"] = float(np.std(grads[name]))
        rows.append(row)
        print(row, flush=True)
    return {"exact_gradient": exact_grad, "rows": rows}


def render(report: dict) -> str:
    config = report["config"]
    meta = report["meta"]
    lines = [
        "# Many series: particle_factor under numpyro.plate",
        "",
        load_line(meta),
        "",
        f"Hierarchical AR(1)-plus-noise model, T = {config['num_steps']}, "
        f"N = {config['num_particles']} float32 particles unless a section says otherwise, "
        "guided proposal, diffusion K = 4.",
        "",
        "## Compile and gradient time of the model's potential against S",
        "",
        "One batched filter: the compile time should not grow with S, the time per "
        "value-and-gradient roughly linearly.",
        "",
        markdown_table(
            ["S", "compile (s)", "value+grad (ms)", "ms per series", "runs"],
            [
                [
                    row["num_series"],
                    row["compile_seconds"],
                    1e3 * row["gradient_seconds"],
                    1e3 * row["gradient_seconds"] / row["num_series"],
                    row["runs"],
                ]
                for row in report["potential"]
            ],
        ),
        "",
    ]
    for nuts in [report.get("nuts"), *report.get("nuts_more", [])]:
        if nuts:
            lines += nuts_section(config, nuts)
    bias = report.get("bias")
    if bias:
        lines += bias_section(config, bias, report.get("nuts"))
    return "\n".join(lines)


def nuts_section(config: dict, nuts: dict) -> list[str]:
    """One NUTS comparison: wall times and the posterior against the exact one."""
    num_particles = nuts.get("num_particles", config["num_particles"])
    # Runs added with --add-nuts record their own protocol; older ones share the report's.
    warm_start = nuts.get("warm_start", config["warm_start"])
    particle_warmup = nuts.get("particle_warmup", config["particle_warmup"])
    # Runs stored before the effective sample size was recorded have none.
    with_ess = all("particle_ess" in row for row in nuts["parameters"])
    lines = [
        f"## NUTS, S = {config['nuts_series']}, N = {num_particles}, "
        f"{particle_warmup} warm-up + {config['num_samples']} draws, one chain",
        "",
        *([f"Added later (`--add-nuts`): {load_line(nuts['meta'])}", ""] if "meta" in nuts else []),
        (
            f"Particle chain warm-started ({particle_warmup} warm-up steps "
            "adapting the step size only, from the exact posterior mean with the exact "
            "run's mass matrix): its time excludes the mass-matrix adaptation."
            if warm_start
            else f"Both chains with {config['num_warmup']} warm-up steps."
        ),
        "",
        markdown_table(
            ["likelihood", "wall (s)", "mean leapfrog steps", "divergences"],
            [
                [name, run["seconds"], run["mean_leapfrog_steps"], run["divergences"]]
                for name, run in [
                    ("particle_factor (batched)", nuts["particle"]),
                    ("exact (Kalman, vmapped)", nuts["exact"]),
                ]
            ],
        ),
        "",
        "Particle posterior against the exact one (target: mean shift within 0.3 SD, "
        "SD ratio within 0.7-1.3):",
        "",
        markdown_table(
            ["parameter", "particle mean", "exact mean", "shift (SD)", "SD ratio"]
            + (["particle ESS"] if with_ess else []),
            [
                [
                    row["parameter"],
                    row["particle_mean"],
                    row["exact_mean"],
                    row["mean_shift_in_sd"],
                    row["sd_ratio"],
                    *([row["particle_ess"]] if with_ess else []),
                ]
                for row in nuts["parameters"]
            ],
        ),
        "",
        f"Largest |shift|: {nuts['max_abs_shift']:.3f} SD; SD ratios in "
        f"[{nuts['min_sd_ratio']:.3f}, {nuts['max_sd_ratio']:.3f}]. Target "
        + (
            "met."
            if nuts["max_abs_shift"] <= 0.3
            and 0.7 <= nuts["min_sd_ratio"]
            and nuts["max_sd_ratio"] <= 1.3
            else "not met: the fixed-noise surrogate at this N is not close enough to the "
            "exact posterior for every parameter."
        ),
        "",
    ]
    return lines


def bias_section(config: dict, bias: dict, nuts: dict | None) -> list[str]:
    """The fixed-noise error of the log-likelihood and its gradient against N."""
    names = ("phi", "log_r", "mu")
    exact = bias["exact_gradient"]
    implied = []
    if nuts and all(
        row["mean_shift_in_sd"] != 0 for row in nuts["parameters"] if row["parameter"] in names
    ):
        # The exact posterior SDs, from the comparison's means and standardised shifts.
        rows = {row["parameter"]: row for row in nuts["parameters"]}
        sds = {
            name: (rows[name]["particle_mean"] - rows[name]["exact_mean"])
            / rows[name]["mean_shift_in_sd"]
            for name in names
        }
        implied = [
            "",
            "Bias times exact posterior SD, the shift (in SD) the bias alone implies: "
            + "; ".join(
                f"N = {row['num_particles']}: "
                + ", ".join(
                    f"{name} {row[f'{name}_grad_error_mean'] * sds[name]:.2f}" for name in names
                )
                for row in bias["rows"]
            )
            + " (ignoring correlations between parameters).",
        ]
    return [
        "## Why N matters: the fixed-noise error of the gradient",
        "",
        *([load_line(bias["meta"]), ""] if "meta" in bias else []),
        f"The summed log-likelihood of the S = {config['nuts_series']} series and its gradient "
        "in the shared parameters, at the exact posterior mean, minus the exact ones: mean "
        "(the bias every key shares) +- SD over keys (what one fixed key adds). A posterior "
        "mean moves by about posterior variance times the gradient error. Exact gradient: "
        + ", ".join(f"{name} {exact[name]:.3g}" for name in names)
        + ".",
        "",
        markdown_table(
            ["N", "keys", "log-lik error", *(f"d/d{name} error" for name in names)],
            [
                [
                    row["num_particles"],
                    row["keys"],
                    f"{row['value_error_mean']:.2f} +- {row['value_error_sd']:.2f}",
                    *(
                        f"{row[f'{name}_grad_error_mean']:.2f} +- "
                        f"{row[f'{name}_grad_error_sd']:.2f}"
                        for name in names
                    ),
                ]
                for row in bias["rows"]
            ],
        ),
        *implied,
        "",
    ]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (.md beside)")
    parser.add_argument("--skip-nuts", action="store_true", help="timings of the potential only")
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="particle NUTS from the exact run's mean and mass matrix (step size adapted only)",
    )
    parser.add_argument(
        "--add-nuts",
        type=int,
        metavar="N",
        help="add (or replace) a NUTS comparison at N particles in the existing report at --out",
    )
    parser.add_argument(
        "--add-bias",
        action="store_true",
        help="add the gradient-error table (at the exact posterior mean of the existing report)",
    )
    options = parser.parse_args(argv)
    options.bias_keys = 4 if options.quick else 12
    options.bias_particles = [8, 16] if options.quick else [64, 128, 256]
    if options.quick:
        # Smoke test: each S compiles (and initialises) the potential afresh, so two of them.
        options.series = [1, 2]
        options.num_steps, options.num_particles = 5, 8
        options.nuts_series, options.num_warmup, options.num_samples = 2, 10, 10
    else:
        options.series = [1, 10, 100]
        options.num_steps, options.num_particles = 50, 64
        options.nuts_series, options.num_warmup, options.num_samples = 20, 300, 400
    options.particle_warmup = (
        100 if options.warm_start and not options.quick else options.num_warmup
    )
    return options


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write the JSON report and markdown table."""
    options = parse_arguments(argv)
    config = {
        key: getattr(options, key)
        for key in (
            "quick",
            "series",
            "num_steps",
            "num_particles",
            "nuts_series",
            "num_warmup",
            "num_samples",
            "warm_start",
            "particle_warmup",
        )
    }
    if options.add_nuts or options.add_bias:
        return add_sections(options)
    report = {"meta": run_metadata(), "config": config, "potential": []}
    for num_series in options.series:
        row = potential_timing(num_series, options.num_steps, options.num_particles)
        report["potential"].append(row)
        print(row, flush=True)
    if not options.skip_nuts:
        # The potential timings first, in case the NUTS part does not finish.
        partial = {**report, "meta": dict(report["meta"])}
        write_report(options.out, partial, render)
        report["nuts"] = nuts_comparison(options, options.num_particles)
        options.bias_point = exact_means(report["nuts"])
        report["bias"] = gradient_bias(options)
    print(write_report(options.out, report, render))
    return report


def exact_means(nuts: dict) -> dict:
    """The exact posterior means of a NUTS comparison, `z` as one vector."""
    means = {row["parameter"]: row["exact_mean"] for row in nuts["parameters"]}
    point = {name: means[name] for name in GLOBALS}
    point["z"] = [means[f"z[{s}]"] for s in range(len(means) - len(GLOBALS))]
    return point


def add_sections(options: argparse.Namespace) -> dict:
    """Add a NUTS comparison at another N, or the gradient-error table, to a stored report.

    The data, the exact run (deterministic, rerun) and the settings are those of the stored
    report; each added part records its own date and machine load.
    """
    report = json.loads(options.out.read_text())
    if report["config"]["quick"] != options.quick:
        raise SystemExit(f"{options.out} was written with quick={report['config']['quick']}")
    if options.add_nuts:
        meta = run_metadata()
        nuts = nuts_comparison(options, options.add_nuts)
        nuts["meta"] = finish_metadata(meta)
        more = [
            run
            for run in report.get("nuts_more", [])
            if run["num_particles"] != nuts["num_particles"]
        ]
        report["nuts_more"] = [*more, nuts]
        write_report(options.out, report, render)
    if options.add_bias:
        meta = run_metadata()
        options.bias_point = exact_means(report["nuts"])
        report["bias"] = gradient_bias(options)
        report["bias"]["meta"] = finish_metadata(meta)
    print(write_report(options.out, report, render))
    return report


if __name__ == "__main__":
    main()
