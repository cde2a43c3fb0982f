r"""Per-gradient cost: what one `value_and_grad` of the filter log-likelihood spends, and on what.

NUTS calls `value_and_grad` of the log-likelihood thousands of times, so its wall time is the
cost users feel. On the AR(1)-plus-noise model of `benchmarks/scaling.py` (T = 30, K = 8
diffusion steps, float32 unless `--x64`), for N in {32, 64, 256, 1024}, one jit-compiled
`value_and_grad` with respect to $(\phi, q, r)$ is timed (the protocol of `_common.time_call`)
and the compiled HLO's instructions are counted, for:

* `default`: `particle_filter` as users call it;
* `checkpoint`: the same with `checkpoint=True` (every step recomputed in the reverse pass);
* `no resampling`: `ess_threshold=0`: the densities, moves, guards, summaries and the scan;
* `resampler x (T-1)`: the diffusion resampler alone on a cloud of that size, times T - 1;
* `summaries`: the default with the ESS, filtered means and variances also returned (they are
  dropped by XLA when only the log-likelihood is used, as in `particle_factor`);
* `unguarded densities`: the no-resampling filter with `log_prob` in place of the NaN-safe
  `safe_log_prob`, for the guards' share;
* `baseline`: with `--baseline REF`, the default row of the package as of git revision REF,
  run in a subprocess on a `git archive` copy, in the same run on the same machine.

The compiler-settings section times the default row at N = 64 once per XLA setting a CPU user
may choose (docs/concepts.md, "Compile time on the CPU"; the test run's is among them), each
in a fresh process (XLA reads `XLA_FLAGS` once per process) with JAX's compilation cache off,
so every compile is a cold one.

    python benchmarks/cost.py                         # the table
    python benchmarks/cost.py --baseline c151462      # with "before" rows
    python benchmarks/cost.py --add-compiler-settings # that section alone, into the stored report

Writes `benchmarks/results/cost.{json,md}`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cost.json"
TRUE = (0.8, 0.5, 0.5)
VARIANTS = (
    "default",
    "checkpoint",
    "summaries",
    "no resampling",
    "unguarded densities",
    "resampler x (T-1)",
)

# Name -> XLA_FLAGS. The older CPU code emitters and LLVM's optimisation level are the two
# settings that changed the filter's compile time, YNNPACK's reduction fusions its run time
# (benchmarks/results/suite_timing.md); `make test` runs with "older emitters + level 1".
_NO_YNN_REDUCE = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"
COMPILER_SETTINGS = {
    "XLA defaults": "",
    "older emitters": "--xla_cpu_use_fusion_emitters=false",
    "level 1": "--xla_backend_optimization_level=1",
    "older emitters + level 1": (
        "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"
    ),
    "older emitters + level 0": (
        "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
    ),
    # XLA hands row reductions with their producers (the attention's logits, max and exp) to
    # YNNPACK by default; profiled slower than XLA's own loops (suite_timing.md).
    "no YNN reductions": _NO_YNN_REDUCE,
    "level 1 + no YNN reductions": "--xla_backend_optimization_level=1 " + _NO_YNN_REDUCE,
    "older emitters + level 1 + no YNN reductions": (
        "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1 " + _NO_YNN_REDUCE
    ),
}
COMPILER_PARTICLES = 64


def ar1(theta):
    """The AR(1)-plus-noise model at `theta = (phi, q, r)` (imports after the x64 switch)."""
    from benchmarks import models

    return models.ar1(theta[0], theta[1], theta[2])


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", default="32,64,256,1024")
    parser.add_argument("--num-time-steps", type=int, default=30)
    parser.add_argument("--diffusion-steps", type=int, default=8)
    parser.add_argument("--x64", action="store_true", help="float64 instead of float32")
    parser.add_argument("--baseline", help="git revision whose default row to time alongside")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="N = 16 only, T = 5 (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--series-lengths",
        default="100,500,1000,2000,5000",
        help="T values of the long-series section (N = 64); empty to skip it",
    )
    parser.add_argument(
        "--compiler-settings",
        default=",".join(COMPILER_SETTINGS),
        help="names from COMPILER_SETTINGS, comma-separated; empty to skip the section",
    )
    parser.add_argument(
        "--add-compiler-settings",
        action="store_true",
        help="measure only the compiler-settings section and add it to the report at --out",
    )
    parser.add_argument(
        "--compiler-rounds",
        type=int,
        default=3,
        help="processes per compiler setting, the settings taking turns (default 3)",
    )
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.particles, args.num_time_steps, args.series_lengths = "16", 5, "10,20"
        args.compiler_settings, args.compiler_rounds = "XLA defaults", 1
    args.compiler_settings = [name for name in args.compiler_settings.split(",") if name]
    unknown = set(args.compiler_settings) - set(COMPILER_SETTINGS)
    if unknown:
        parser.error(
            f"unknown compiler settings {sorted(unknown)}; choose from {COMPILER_SETTINGS}"
        )
    args.series_lengths = [int(t) for t in args.series_lengths.split(",") if t]
    args.particles = [int(n) for n in args.particles.split(",")]
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def measure(args) -> list[dict]:
    """Time every variant at every N; returns one row per (variant, N)."""
    import jax

    jax.config.update("jax_enable_x64", args.x64)
    import jax.numpy as jnp

    import numpyro_diffres as ndr
    from benchmarks._common import time_call

    theta = jnp.asarray(TRUE)
    _, observations = ndr.simulate(jax.random.PRNGKey(0), ar1(theta), args.num_time_steps)
    resampler = ndr.resampling.diffusion(num_steps=args.diffusion_steps)
    key = jax.random.PRNGKey(1)

    def filter_gradient(num_particles, **kwargs):
        def log_likelihood(theta):
            return ndr.particle_filter(
                key, ar1(theta), observations, num_particles=num_particles, **kwargs
            ).log_likelihood

        return jax.value_and_grad(log_likelihood)

    def with_summaries(num_particles):
        def objective(theta):
            result = ndr.particle_filter(
                key, ar1(theta), observations, num_particles=num_particles, resampler=resampler
            )
            return result.log_likelihood, (
                result.ess,
                result.filtered_mean,
                result.filtered_variance,
            )

        return jax.value_and_grad(objective, has_aux=True)

    def unguarded(num_particles):
        # The no-resampling filter written out with plain log_prob: no guards, no summaries.
        def log_likelihood(theta):
            model = ar1(theta)
            initial_key, steps_key = jax.random.split(key)
            x = model.initial.sample(initial_key, (num_particles,))
            log_weights = model.emission(x, 0).log_prob(observations[0]) - jnp.log(num_particles)

            def body(carry, inputs):
                x, log_weights = carry
                step_key, y = inputs
                x = model.transition(x, 0).sample(step_key)
                log_weights = log_weights + model.emission(x, 0).log_prob(y)
                return (x, log_weights), None

            keys = jax.random.split(steps_key, observations.shape[0] - 1)
            (_, log_weights), _ = jax.lax.scan(body, (x, log_weights), (keys, observations[1:]))
            return jax.nn.logsumexp(log_weights)

        return jax.value_and_grad(log_likelihood)

    def resampler_alone(num_particles):
        particles = jax.random.normal(jax.random.PRNGKey(2), (num_particles, 1))
        log_weights = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(3), (num_particles,)))

        def loss(particles, log_weights):
            return jnp.sum(resampler(key, log_weights, particles)[0] ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1)), (particles, log_weights)

    rows = []
    for num_particles in args.particles:
        for variant in args.variants:
            scale = 1
            arguments = (theta,)
            if variant == "default":
                function = filter_gradient(num_particles, resampler=resampler)
            elif variant == "checkpoint":
                function = filter_gradient(num_particles, resampler=resampler, checkpoint=True)
            elif variant == "summaries":
                function = with_summaries(num_particles)
            elif variant == "no resampling":
                function = filter_gradient(num_particles, ess_threshold=0.0)
            elif variant == "unguarded densities":
                function = unguarded(num_particles)
            else:
                function, arguments = resampler_alone(num_particles)
                scale = args.num_time_steps - 1
            timing = time_call(
                function,
                arguments,
                repeats=2 if args.quick else 7,
                min_seconds=0.0 if args.quick else 1.0,
                max_runs=200,
            )
            compiled = jax.jit(function).lower(*arguments).compile()
            operations = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
            rows.append(
                {
                    "variant": variant,
                    "N": num_particles,
                    "ms": 1e3 * timing.median * scale,
                    "runs": timing.runs,
                    "hlo_instructions": operations,
                    "compile_s": timing.compile,
                }
            )
            print(f"{variant:22s} N={num_particles:5d} {rows[-1]['ms']:9.3f} ms", flush=True)
    return rows


LONG_SERIES_PARTICLES = 64


def long_series(args) -> list[dict]:
    """Per-gradient time and compiled temporary memory against T (N = 64).

    Both checkpoint policies: is the cost linear in T, and what does the gradient hold?
    """
    import jax

    jax.config.update("jax_enable_x64", args.x64)
    import jax.numpy as jnp

    import numpyro_diffres as ndr
    from benchmarks._common import time_call

    theta = jnp.asarray(TRUE)

    resampler = ndr.resampling.diffusion(num_steps=args.diffusion_steps)
    key = jax.random.PRNGKey(1)
    rows = []
    for num_steps in args.series_lengths:
        _, observations = ndr.simulate(jax.random.PRNGKey(0), ar1(theta), num_steps)
        for checkpoint in (False, True):

            def log_likelihood(theta, observations=observations, checkpoint=checkpoint):
                return ndr.particle_filter(
                    key,
                    ar1(theta),
                    observations,
                    num_particles=LONG_SERIES_PARTICLES,
                    resampler=resampler,
                    checkpoint=checkpoint,
                ).log_likelihood

            function = jax.value_and_grad(log_likelihood)
            timing = time_call(
                function,
                (theta,),
                repeats=2 if args.quick else 5,
                min_seconds=0.0 if args.quick else 2.0,
                max_runs=50,
            )
            compiled = jax.jit(function).lower(theta).compile()
            memory = compiled.memory_analysis()
            rows.append(
                {
                    "T": num_steps,
                    "checkpoint": checkpoint,
                    "ms": 1e3 * timing.median,
                    "us_per_step": 1e6 * timing.median / num_steps,
                    "temp_MiB": memory.temp_size_in_bytes / 2**20,
                    "runs": timing.runs,
                    "compile_s": timing.compile,
                }
            )
            print(f"long series T={num_steps:5d} checkpoint={checkpoint}: {rows[-1]}", flush=True)
    return rows


def default_rows_in_subprocess(args, particles, directory, environment) -> list[dict]:
    """The default row at each of `particles`, measured by this script in a new process."""
    out = Path(directory) / "rows.json"
    command = (
        [
            sys.executable,
            str(Path(__file__)),
            "--measure-only",
            "--variants",
            "default",
            "--particles",
            ",".join(map(str, particles)),
            "--num-time-steps",
            str(args.num_time_steps),
            "--diffusion-steps",
            str(args.diffusion_steps),
            "--out",
            str(out),
        ]
        + (["--x64"] if args.x64 else [])
        + (["--quick"] if args.quick else [])
    )
    subprocess.run(command, check=True, env=environment, cwd=directory)
    return json.loads(out.read_text())


def baseline_rows(args) -> list[dict]:
    """The default row of revision `args.baseline`, timed in a subprocess on its own copy."""
    with tempfile.TemporaryDirectory() as directory:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
        environment = dict(os.environ, PYTHONPATH=directory)
        rows = default_rows_in_subprocess(args, args.particles, directory, environment)
    for row in rows:
        row["variant"] = f"baseline {args.baseline}"
    return rows


def compiler_setting_rows(args) -> list[dict]:
    """The default row at N = 64 (16 under `--quick`) under each of `args.compiler_settings`.

    One process per setting and round, with JAX's compilation cache off: `compile_s` is a cold
    trace, lowering and XLA compile of the `value_and_grad` (`_common.time_call`). The settings
    take turns, round by round (`--compiler-rounds`), so that a slow spell of a shared machine
    falls on all of them; each row reports the median over rounds and the range.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    }
    environment["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    num_particles = args.particles[0] if args.quick else COMPILER_PARTICLES
    measured = {name: [] for name in args.compiler_settings}
    for round_number in range(args.compiler_rounds):
        for name in args.compiler_settings:
            flags = COMPILER_SETTINGS[name]
            with tempfile.TemporaryDirectory() as directory:
                (row,) = default_rows_in_subprocess(
                    args, [num_particles], directory, dict(environment, XLA_FLAGS=flags)
                )
            measured[name].append(row)
            print(f"compiler setting {name!r}, round {round_number}: {row}", flush=True)
    rows = []
    for name, runs in measured.items():
        compile_s = [run["compile_s"] for run in runs]
        ms = [run["ms"] for run in runs]
        rows.append(
            {
                "setting": name,
                "XLA_FLAGS": COMPILER_SETTINGS[name],
                "N": num_particles,
                "rounds": len(runs),
                "compile_s": statistics.median(compile_s),
                "ms": statistics.median(ms),
                "compile_s_range": [min(compile_s), max(compile_s)],
                "ms_range": [min(ms), max(ms)],
            }
        )
    return rows


def _range(bounds) -> str:
    """`low-high` over a section's rounds, to 3 significant digits ("-" for one run)."""
    return f"{bounds[0]:.3g}-{bounds[1]:.3g}" if bounds and bounds[0] != bounds[1] else "-"


def render(report) -> str:
    from benchmarks._common import load_line, markdown_table

    meta = report["meta"]
    rows = report["rows"]
    particles = sorted({row["N"] for row in rows})
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    cell = {(row["variant"], row["N"]): row for row in rows}
    default = {n: cell[("default", n)]["ms"] for n in particles if ("default", n) in cell}
    lines = [
        "# Per-gradient cost",
        "",
        load_line(meta),
        "",
        f"One jit-compiled `value_and_grad` of the AR(1)-plus-noise filter log-likelihood with "
        f"respect to (phi, q, r): T = {meta['num_time_steps']}, diffusion K = "
        f"{meta['diffusion_steps']}, {meta['dtype']}; median ms per call (`_common.time_call`), "
        "and in parentheses the share of the default row.",
        "",
    ]
    table = []
    for variant in variants:
        cells = [variant]
        for n in particles:
            row = cell.get((variant, n))
            if row is None:
                cells.append("-")
            else:
                share = row["ms"] / default[n] if n in default else None
                cells.append(f"{row['ms']:.3g}" + (f" ({share:.2f})" if share is not None else ""))
        table.append(cells)
    lines.append(markdown_table(["ms per call"] + [f"N = {n}" for n in particles], table))
    lines += ["", "Compiled HLO instructions (a proxy for per-operation overhead):", ""]
    lines.append(
        markdown_table(
            ["instructions"] + [f"N = {n}" for n in particles],
            [
                [variant]
                + [
                    str(cell[(variant, n)]["hlo_instructions"]) if (variant, n) in cell else "-"
                    for n in particles
                ]
                for variant in variants
            ],
        )
    )
    if report.get("long_series"):
        lines += [
            "",
            "## Long series",
            "",
            f"The default row's `value_and_grad` at N = {LONG_SERIES_PARTICLES} against T, with "
            "`checkpoint=False` (store every step's intermediates; what `checkpoint=None` "
            "chooses below 2^20 particle coordinates over time) and `checkpoint=True` (recompute "
            "each step in the reverse pass). Time per step should stay flat if the cost is "
            "linear in T; the compiled plan's temporary memory grows with T either way (the "
            "reverse pass needs each step's cloud), the question is how fast.",
            "",
            markdown_table(
                ["T", "checkpoint", "ms per call", "us per step", "temporary MiB", "compile s"],
                [
                    [
                        str(row["T"]),
                        "yes" if row["checkpoint"] else "no",
                        row["ms"],
                        row["us_per_step"],
                        row["temp_MiB"],
                        row["compile_s"],
                    ]
                    for row in report["long_series"]
                ],
            ),
        ]
    settings = report.get("compiler_settings")
    if settings and settings["rows"]:
        rows = settings["rows"]
        lines += [
            "",
            "## Compiler settings",
            "",
            *(
                [f"Added later (`--add-compiler-settings`): {load_line(settings['meta'])}", ""]
                if "meta" in settings
                else []
            ),
            f"The default row at N = {rows[0]['N']} (T = {meta['num_time_steps']}, K = "
            f"{meta['diffusion_steps']}), one fresh process per `XLA_FLAGS` setting and round "
            "with JAX's compilation cache off, the settings taking turns over "
            f"{rows[0].get('rounds', 1)} round(s): seconds to trace, lower and compile the "
            "`value_and_grad` cold, and the median ms per call of the compiled code; the median "
            "over rounds, and the range.",
            "",
            markdown_table(
                ["setting", "XLA_FLAGS", "compile s", "range", "ms per call", "range"],
                [
                    [
                        row["setting"],
                        f"`{row['XLA_FLAGS']}`" if row["XLA_FLAGS"] else "(none)",
                        row["compile_s"],
                        _range(row.get("compile_s_range")),
                        row["ms"],
                        _range(row.get("ms_range")),
                    ]
                    for row in rows
                ],
                align="llrrrr",
            ),
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    if args.measure_only:
        rows = measure(args)
        args.out.write_text(json.dumps(rows))
        return rows
    from benchmarks._common import finish_metadata, run_metadata, write_report

    if args.add_compiler_settings:
        report = json.loads(args.out.read_text())
        # The stored table's settings, so that the section times the same problem.
        stored = report["meta"]
        args.num_time_steps, args.diffusion_steps = (
            stored["num_time_steps"],
            stored["diffusion_steps"],
        )
        args.x64 = stored["dtype"] == "float64"
        section_meta = run_metadata(settings=args.compiler_settings)
        rows = compiler_setting_rows(args)
        report["compiler_settings"] = {"meta": finish_metadata(section_meta), "rows": rows}
        text = write_report(args.out, report, render)
        print(text)
        return rows
    meta = run_metadata(
        num_time_steps=args.num_time_steps,
        diffusion_steps=args.diffusion_steps,
        dtype="float64" if args.x64 else "float32",
        baseline=args.baseline,
        variants=args.variants,
    )
    rows = measure(args)
    if args.baseline:
        rows += baseline_rows(args)
    report = {
        "meta": meta,
        "rows": rows,
        "long_series": long_series(args),
        "compiler_settings": {"rows": compiler_setting_rows(args)},
    }
    text = write_report(args.out, report, render)
    print(text)
    return rows


if __name__ == "__main__":
    main()
