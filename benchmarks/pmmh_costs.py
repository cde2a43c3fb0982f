"""Where a PMMH run's time goes: fixed costs (start, compilation) against per-iteration cost.

`which_method` counts time to 400 ESS as warm-up (compilation included) plus scaled sampling;
on a short problem the fixed part decides the ratio to other samplers. This script splits it
for `ndr.infer.PMMH` on the growth model (N = 256, 4 vectorised chains, systematic resampling
at ESS < N/2, the `which_method` settings), each phase in a fresh `MCMC` (so each compiles):

* `warmup(1)`: the start (its compiled search and first estimate) plus the warm-up loop's
  compilation and one step;
* `run(1)` after it: the sampling loop's compilation and one step;
* `run(S)`: the same plus S - 1 steps, so the per-iteration cost is
  (run(S) - run(1)) / (S - 1).

    python -m benchmarks pmmh_costs [--quick] [--out benchmarks/results/pmmh_costs.json]
"""

import argparse
import sys
import time
from pathlib import Path

import jax
from numpyro.infer import MCMC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import load_line, markdown_table, run_metadata, write_report  # noqa: E402
from benchmarks.models import growth_observations  # noqa: E402
from benchmarks.which_method import growth_filter_model  # noqa: E402  (its settings)

RESULTS = Path(__file__).resolve().parent / "results" / "pmmh_costs.json"


def phases(num_particles, num_chains, num_samples):
    """Seconds of `warmup(1)`, then `run(1)`, and of `run(num_samples)` in a fresh MCMC."""
    model = growth_filter_model(
        num_particles, resampler=ndr.resampling.systematic(), ess_threshold=0.5
    )
    data = growth_observations()
    seconds = {}
    for label, samples in (("one", 1), ("many", num_samples)):
        mcmc = MCMC(
            ndr.infer.PMMH(model),
            num_warmup=1,
            num_samples=samples,
            num_chains=num_chains,
            chain_method="vectorized",
            progress_bar=False,
        )
        start = time.perf_counter()
        mcmc.warmup(jax.random.PRNGKey(0), data, collect_warmup=False)
        jax.block_until_ready(mcmc.post_warmup_state)
        seconds[f"warmup_1_{label}"] = time.perf_counter() - start
        start = time.perf_counter()
        mcmc.run(mcmc.post_warmup_state.rng_key, data)
        jax.block_until_ready(mcmc.get_samples())
        seconds[f"run_{samples}"] = time.perf_counter() - start
    per_iteration = (seconds[f"run_{num_samples}"] - seconds["run_1"]) / (num_samples - 1)
    return {
        "start_and_warmup_compile": seconds["warmup_1_one"],
        "sampling_compile": seconds["run_1"],
        "per_iteration": per_iteration,
        "raw": seconds,
    }


def render(report):
    meta = report["meta"]
    row = report["result"]
    lines = [
        "# PMMH: fixed costs against per-iteration cost (growth model)",
        "",
        load_line(meta),
        "",
        f"`ndr.infer.PMMH`, N = {meta['num_particles']}, {meta['num_chains']} vectorised "
        "chains, systematic resampling at ESS < N/2; each MCMC compiles afresh. The start and "
        "the warm-up loop's compilation are the seconds of `warmup` with one iteration; the "
        "sampling loop's compilation those of `run` with one sample; the per-iteration cost is "
        f"(run({meta['num_samples']}) - run(1)) / {meta['num_samples'] - 1}.",
        "",
        markdown_table(
            ["phase", "seconds"],
            [
                ["start + warm-up compilation (+ 1 step)", row["start_and_warmup_compile"]],
                ["sampling compilation (+ 1 step)", row["sampling_compile"]],
                ["one iteration of every chain", row["per_iteration"]],
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = {"num_particles": 256, "num_chains": 4, "num_samples": 300 if args.quick else 3000}
    report = {"meta": run_metadata(quick=args.quick, **settings)}
    report["result"] = phases(**settings)
    print(write_report(args.out, report, render))
    return report


if __name__ == "__main__":
    main()
