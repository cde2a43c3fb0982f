"""Latent paths after the fit: what smoothed paths and forecasts cost, and what they cost NUTS.

Three measurements, in one run (float64, AR(1)-plus-noise model, diffusion PF likelihood):

1. `Predictive` over posterior draws with `sample_latent_paths` on (FFBSi paths with N
   particles, one path and a forecast per draw): wall time by the shared timing protocol.
2. NUTS on the same model with the sites off (`predict=False`) and on (present under MCMC):
   seconds per sampling iteration, same keys. The potential is the same (XLA removes the
   unused smoother), so both chains are identical; the extra time with the sites is NumPyro
   replaying the model once per kept draw to record deterministic sites.
3. Accuracy of `particle_smoother` at the setting of the target test (linear-Gaussian, d = 2,
   T = 100, N = 512): standardised errors of the smoothed means against dynamax's RTS
   smoother over 16 independent repeats of 16 paths.

    python benchmarks/latent_paths.py [--quick] [--out benchmarks/results/latent_paths.json]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import scipy.stats  # noqa: E402
from numpyro.infer import MCMC, NUTS, Predictive  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import load_line, markdown_table, run_metadata, time_call, write_report  # noqa: E402
from benchmarks.models import ar1  # noqa: E402
from numpyro_diffres import resampling  # noqa: E402
from numpyro_diffres.primitives import sample_latent_paths  # noqa: E402
from numpyro_diffres.smoothing import particle_smoother  # noqa: E402

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results" / "latent_paths.json"
TRUE = {"phi": 0.8, "q": 0.6, "r": 0.5}
FULL = {
    "num_steps": 100,
    "smoother_particles": 256,
    "factor_particles": 64,
    "draws": 400,
    "horizon": 10,
    "num_warmup": 30,
    "num_samples": 30,
    "target_steps": 100,
    "target_particles": 512,
    "target_repeats": 16,
    "target_paths": 16,
    "untimed_sampling_run": True,
}
# Smoke test: compiling takes the time, whatever the sizes.
QUICK = {
    "num_steps": 10,
    "smoother_particles": 8,
    "factor_particles": 8,
    "draws": 4,
    "horizon": 2,
    "num_warmup": 3,
    "num_samples": 3,
    "target_steps": 5,
    "target_particles": 16,
    "target_repeats": 3,
    "target_paths": 2,
    # No untimed sampling run before the timed one (the quick timings are not reported).
    "untimed_sampling_run": False,
}


def make_model(config):
    def model(y, predict=False):
        phi = numpyro.sample("phi", dist.Uniform(-0.98, 0.98))
        q = numpyro.sample("q", dist.LogNormal(math.log(0.6), 0.3))
        r = numpyro.sample("r", dist.LogNormal(math.log(0.5), 0.3))
        ssm = ar1(phi, q, r)
        ndr.particle_factor(
            "y",
            ssm,
            y,
            num_particles=config["factor_particles"],
            resampler=resampling.diffusion(num_steps=4),
        )
        if predict:
            sample_latent_paths(
                "x",
                ssm,
                y,
                num_particles=config["smoother_particles"],
                num_steps_ahead=config["horizon"],
            )

    return model


def time_nuts(model, observations, config, predict):
    mcmc = MCMC(
        NUTS(model),
        num_warmup=config["num_warmup"],
        num_samples=config["num_samples"],
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.warmup(jax.random.PRNGKey(2), observations, predict=predict, extra_fields=("num_steps",))
    jax.block_until_ready(mcmc.post_warmup_state)
    warmup = time.perf_counter() - start  # includes compilation
    post_warmup = mcmc.post_warmup_state
    if config["untimed_sampling_run"]:
        # The first sampling run compiles; the second, from the same state, is timed.
        mcmc.run(post_warmup.rng_key, observations, predict=predict, extra_fields=("num_steps",))
        jax.block_until_ready(mcmc.get_samples())
        mcmc.post_warmup_state = post_warmup
    start = time.perf_counter()
    mcmc.run(post_warmup.rng_key, observations, predict=predict, extra_fields=("num_steps",))
    samples = jax.block_until_ready(mcmc.get_samples())
    sampling = time.perf_counter() - start
    steps = float(np.mean(mcmc.get_extra_fields()["num_steps"]))
    return {
        "warmup_seconds": warmup,
        "sampling_seconds": sampling,
        "seconds_per_iteration": sampling / config["num_samples"],
        "leapfrog_steps_per_iteration": steps,
        "sites": sorted(samples),
    }, samples


def target_accuracy(config):
    """Standardised errors of FFBSi smoothed means against RTS (the target test's setting)."""
    from dynamax.linear_gaussian_ssm import ParamsLGSSM, lgssm_smoother
    from dynamax.linear_gaussian_ssm.inference import (
        ParamsLGSSMDynamics,
        ParamsLGSSMEmissions,
        ParamsLGSSMInitial,
    )

    params = ndr.LinearGaussianParams(
        jnp.array([0.5, -0.5]),
        jnp.array([[1.0, 0.3], [0.3, 0.8]]),
        jnp.array([[0.9, 0.2], [-0.2, 0.85]]),
        jnp.array([[0.5, 0.1], [0.1, 0.3]]),
        jnp.array([[1.0, 0.5]]),
        jnp.array([[0.4]]),
    )
    _, y = ndr.simulate(jax.random.PRNGKey(0), ndr.linear_gaussian(params), config["target_steps"])
    lgssm = ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=params.initial_mean, cov=params.initial_cov),
        dynamics=ParamsLGSSMDynamics(
            weights=params.transition_matrix,
            bias=jnp.zeros(2),
            input_weights=jnp.zeros((2, 0)),
            cov=params.transition_cov,
        ),
        emissions=ParamsLGSSMEmissions(
            weights=params.emission_matrix,
            bias=jnp.zeros(1),
            input_weights=jnp.zeros((1, 0)),
            cov=params.emission_cov,
        ),
    )
    exact = np.asarray(lgssm_smoother(lgssm, y).smoothed_means)

    def means(key):
        paths = particle_smoother(
            key,
            ndr.linear_gaussian(params),
            y,
            num_particles=config["target_particles"],
            num_paths=config["target_paths"],
        )
        return paths.mean(0)

    repeats = config["target_repeats"]
    timing = time_call(
        jax.vmap(means),
        (jax.random.split(jax.random.PRNGKey(1), repeats),),
        repeats=1,
        min_seconds=0.0,
    )
    estimates = np.asarray(timing.output)
    se = estimates.std(0, ddof=1) / math.sqrt(repeats)
    z = (estimates.mean(0) - exact) / se
    threshold = float(scipy.stats.t.ppf(1 - 0.01 / (2 * z.size), repeats - 1))
    return {
        "comparisons": int(z.size),
        "max_abs_z": float(np.max(np.abs(z))),
        "count_abs_z_above_3": int(np.sum(np.abs(z) > 3)),
        "expected_count_above_3": float(z.size * 2 * scipy.stats.t.sf(3, repeats - 1)),
        "bonferroni_t_threshold": threshold,
        "passes": bool(np.max(np.abs(z)) < threshold),
        "seconds_for_all_repeats": timing.median,
    }


def render(report):
    config, nuts = report["config"], report["nuts"]
    lines = [
        "# Latent paths: smoothed paths and forecasts after the fit",
        "",
        load_line(report["meta"]),
        "",
        f"AR(1)-plus-noise model, T = {config['num_steps']}, float64; likelihood: diffusion PF "
        f"(N = {config['factor_particles']}, K = 4); paths: FFBSi with "
        f"N = {config['smoother_particles']}, one path and a {config['horizon']}-step forecast "
        "per draw.",
        "",
        "## Predictive",
        "",
        markdown_table(
            ["draws", "seconds (median)", "ms per draw", "compile s"],
            [
                [
                    config["draws"],
                    report["predictive"]["seconds"],
                    1000 * report["predictive"]["seconds"] / config["draws"],
                    report["predictive"]["compile_seconds"],
                ]
            ],
        ),
        "",
        "## NUTS with and without the sites (same run, same keys)",
        "",
        markdown_table(
            [
                "sites",
                "s per iteration",
                "leapfrog steps",
                "warm-up s (with compile)",
                "sampling s",
            ],
            [
                [
                    label,
                    nuts[key]["seconds_per_iteration"],
                    nuts[key]["leapfrog_steps_per_iteration"],
                    nuts[key]["warmup_seconds"],
                    nuts[key]["sampling_seconds"],
                ]
                for label, key in (("off (predict=False)", "without"), ("on", "with"))
            ],
        ),
        "",
        f"Identical draws with and without the sites: {report['identical_chains']}. "
        f"{config['num_warmup']} warm-up + {config['num_samples']} draws, one chain; "
        + (
            "the sampling phase is run twice from the same state and the second (compiled) "
            "run timed."
            if config.get("untimed_sampling_run", True)
            else "one sampling run, timed with its compilation (quick run)."
        ),
        "",
        "## Smoother accuracy (target test setting)",
        "",
    ]
    accuracy = report["accuracy"]
    lines.append(
        markdown_table(
            ["comparisons", "max abs z", "count abs z > 3", "expected count", "threshold"],
            [
                [
                    accuracy["comparisons"],
                    accuracy["max_abs_z"],
                    accuracy["count_abs_z_above_3"],
                    accuracy["expected_count_above_3"],
                    accuracy["bonferroni_t_threshold"],
                ]
            ],
        )
    )
    lines += [
        "",
        f"T = {config['target_steps']}, N = {config['target_particles']}, d = 2, "
        f"{config['target_repeats']} independent repeats of {config['target_paths']} paths; z is "
        "the repeat-mean error over its standard error (t with repeats - 1 dof); the threshold "
        "is the Bonferroni quantile for a 1% family-wise rate.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    report = {"meta": run_metadata(quick=args.quick), "config": config}

    _, observations = ndr.simulate(jax.random.PRNGKey(0), ar1(**TRUE), config["num_steps"])
    model = make_model(config)

    nuts = {}
    without, samples_without = time_nuts(model, observations, config, predict=False)
    with_sites, samples_with = time_nuts(model, observations, config, predict=True)
    nuts["without"], nuts["with"] = without, with_sites
    report["nuts"] = nuts
    report["identical_chains"] = all(
        np.array_equal(samples_without[name], samples_with[name]) for name in ("phi", "q", "r")
    )

    # Posterior draws for Predictive: the NUTS draws, repeated to the requested number.
    repeat = -(-config["draws"] // config["num_samples"])
    posterior = {
        name: jnp.tile(samples_without[name], repeat)[: config["draws"]]
        for name in ("phi", "q", "r")
    }
    predictive = Predictive(
        model, posterior, return_sites=["x_states", "x_forecast", "x_forecast_observations"]
    )
    timing = time_call(
        lambda key: predictive(key, observations, predict=True),
        (jax.random.PRNGKey(3),),
        repeats=1,
        min_seconds=0.0,
    )
    shapes = {name: list(value.shape) for name, value in timing.output.items()}
    report["predictive"] = {
        "seconds": timing.median,
        "compile_seconds": timing.compile,
        "shapes": shapes,
        "finite": bool(all(np.all(np.isfinite(v)) for v in timing.output.values())),
    }
    report["accuracy"] = target_accuracy(config)
    print(write_report(args.out, report, render))
    return report


if __name__ == "__main__":
    main()
