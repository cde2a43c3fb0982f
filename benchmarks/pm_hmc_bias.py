r"""Pseudo-marginal HMC's bias: NUTS on (phi, u) through a diffusion particle factor.

`particle_factor(..., noise="sampled", resampler=diffusion(num_steps=4))` makes the filter's
standard normals $u$ a latent site and its estimate smooth in $(\phi, u)$, so NUTS samples
$p(\phi)\,N(u; 0, I)\,\hat p_N(y \mid \phi, u)$: pseudo-marginal HMC (Alenlöv, Doucet and
Lindsten, JMLR 2021). Diffusion resampling is consistent, not unbiased, so the phi-marginal
of that target is $\propto p(\phi)\,E_u[\hat p_N(y \mid \phi, u)]$, not the posterior; this
script measures how far off it is, per N.

Model (`benchmarks.models.ar1`): $x_t = \phi x_{t-1} + N(0, q^2)$, $y_t = x_t + N(0, r^2)$,
stationary start, $q = r = 0.5$ known, $\phi \sim U(-1, 1)$ unknown, data simulated at
$\phi = 0.7$ with T = 100. The exact posterior of phi is computed by quadrature of the
prior times the Kalman likelihood on a fine grid (no Monte Carlo error). Rows, each one
`MCMC(NUTS)` run with the same settings (float64):

* `pm_hmc`: NUTS on (phi, u), the diffusion factor with `noise="sampled"`, for each N;
* `fixed_key`: NUTS on phi alone through the same filter with one fixed key (the
  common-random-numbers surrogate that `particle_factor` gives without `noise`), for each N;
* `kalman`: NUTS on the exact likelihood: the Monte Carlo error of the sampler settings alone.

Bias is (posterior mean - exact mean) / exact SD, with its Monte Carlo standard error in the
same units (ESS from ArviZ); a bias within about 2 MCSE is not resolved by the run.

    python -m benchmarks pm_hmc_bias [--quick] [--out benchmarks/results/pm_hmc_bias.json]
        [--num-particles 8 16 32 64] [--num-warmup 500] [--num-samples 1000] [--num-chains 2]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import arviz as az  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import load_line, markdown_table, run_metadata, write_report  # noqa: E402
from benchmarks.models import ar1, ar1_params  # noqa: E402

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results" / "pm_hmc_bias.json"
TRUE = {"phi": 0.7, "q": 0.5, "r": 0.5}
FULL = {
    "num_steps": 100,
    "num_particles": [8, 16, 32, 64],
    "diffusion_steps": 4,
    "num_warmup": 500,
    "num_samples": 1000,
    "num_chains": 2,
    "grid_points": 4001,
}
# Smoke test: shorter data, two particle counts, short chains (numbers not meaningful).
QUICK = {
    "num_steps": 30,
    "num_particles": [8, 16],
    "diffusion_steps": 4,
    "num_warmup": 150,
    "num_samples": 150,
    "num_chains": 1,
    "grid_points": 2001,
}


def exact_posterior(observations, grid_points):
    """Mean and SD of phi by quadrature: uniform prior times the Kalman likelihood."""
    grid = np.linspace(-1.0, 1.0, grid_points + 2)[1:-1]
    log_likelihood = jax.jit(
        jax.vmap(
            lambda phi: ndr.kalman_log_likelihood(
                ar1_params(phi, TRUE["q"], TRUE["r"]), observations[:, None]
            )
        )
    )(jnp.asarray(grid))
    log_likelihood = np.asarray(log_likelihood)
    weights = np.exp(log_likelihood - log_likelihood.max())
    weights /= weights.sum()
    mean = float(weights @ grid)
    return {"mean": mean, "sd": float(math.sqrt(weights @ (grid - mean) ** 2))}


def particle_model(y, num_particles, diffusion_steps, noise):
    """Phi ~ U(-1, 1) and the diffusion particle factor (`noise="sampled"` or a fixed key)."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    ndr.particle_factor(
        "y",
        ar1(phi, TRUE["q"], TRUE["r"]),
        y,
        num_particles=num_particles,
        resampler=ndr.resampling.diffusion(num_steps=diffusion_steps),
        noise=noise,
        key=None if noise else jax.random.PRNGKey(11),
    )


def kalman_model(y):
    """Phi ~ U(-1, 1) and the exact log-likelihood."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    numpyro.factor(
        "y", ndr.kalman_log_likelihood(ar1_params(phi, TRUE["q"], TRUE["r"]), y[:, None])
    )


def run_nuts(model, observations, config, seed):
    """One `MCMC(NUTS)` run: phi's draws `(chains, draws)`, divergences, leapfrog steps, time."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=config["num_warmup"],
        num_samples=config["num_samples"],
        num_chains=config["num_chains"],
        chain_method="vectorized",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), observations, extra_fields=("diverging", "num_steps"))
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["phi"])
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    return {
        "draws": draws,
        "divergences": int(np.sum(extra["diverging"])),
        "leapfrog_steps": float(np.mean(extra["num_steps"])),
        "seconds": seconds,
    }


def summarise(method, num_particles, run, exact):
    """A table row: posterior mean and SD of phi, bias and its MCSE in exact posterior SDs."""
    draws = run["draws"]
    ess = float(az.ess(draws))
    mean, sd = float(draws.mean()), float(draws.std())
    return {
        "method": method,
        "N": num_particles,
        "mean": mean,
        "sd": sd,
        "r_hat": float(az.rhat(draws)) if draws.shape[0] > 1 else None,
        "bias_in_sd": (mean - exact["mean"]) / exact["sd"],
        "mcse_in_sd": sd / math.sqrt(ess) / exact["sd"],
        "sd_ratio": sd / exact["sd"],
        "ess": ess,
        "divergences": run["divergences"],
        "leapfrog_steps": run["leapfrog_steps"],
        "seconds": run["seconds"],
    }


def render(report):
    config, exact = report["config"], report["exact"]
    rows = [
        [
            row["method"],
            "-" if row["N"] is None else str(row["N"]),
            row["mean"],
            row["sd"],
            row["bias_in_sd"],
            row["mcse_in_sd"],
            row["sd_ratio"],
            row["ess"],
            row["r_hat"],
            row["divergences"],
            row["leapfrog_steps"],
            row["seconds"],
        ]
        for row in report["rows"]
    ]
    lines = [
        "# Pseudo-marginal HMC: bias of the phi-marginal",
        "",
        load_line(report["meta"]),
        "",
        f"AR(1) plus noise, T = {config['num_steps']}, q = r = 0.5, phi ~ U(-1, 1), data at "
        f"phi = {TRUE['phi']}; exact posterior (quadrature): mean {exact['mean']:.4f}, "
        f"SD {exact['sd']:.4f}. Diffusion resampling with K = {config['diffusion_steps']} "
        f"(ODE); NUTS {config['num_warmup']} warm-up + {config['num_samples']} draws x "
        f"{config['num_chains']} chain(s), float64."
        + (" Quick run: too short to resolve a bias." if report["meta"].get("quick") else ""),
        "",
        markdown_table(
            [
                "method",
                "N",
                "mean",
                "SD",
                "bias (SDs)",
                "MCSE (SDs)",
                "SD ratio",
                "ESS",
                "R-hat",
                "divergences",
                "leapfrog steps",
                "seconds",
            ],
            rows,
        ),
        "",
        'pm_hmc: NUTS on (phi, u) with `noise="sampled"`; fixed_key: NUTS on phi with one '
        "fixed filter key; kalman: NUTS on the exact likelihood. Bias = (mean - exact mean) / "
        "exact SD; MCSE = SD / sqrt(ESS) / exact SD; seconds include compilation.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--num-particles", type=int, nargs="+", help="override N values")
    for name in ("num_warmup", "num_samples", "num_chains"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override {name}")
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    for name in ("num_particles", "num_warmup", "num_samples", "num_chains"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    report = {"meta": run_metadata(quick=args.quick), "config": config}
    _, observations = ndr.simulate(
        jax.random.PRNGKey(0), ar1(TRUE["phi"], TRUE["q"], TRUE["r"]), config["num_steps"]
    )
    exact = report["exact"] = exact_posterior(observations, config["grid_points"])
    rows = [summarise("kalman", None, run_nuts(kalman_model, observations, config, 1), exact)]
    for num_particles in config["num_particles"]:
        for method, noise in (("pm_hmc", "sampled"), ("fixed_key", None)):
            model = lambda y, n=num_particles, noise=noise: particle_model(  # noqa: E731
                y, n, config["diffusion_steps"], noise
            )
            run = run_nuts(model, observations, config, 2)
            rows.append(summarise(method, num_particles, run, exact))
            print(rows[-1], flush=True)
    report["rows"] = rows
    print(write_report(args.out, report, render))
    return report


if __name__ == "__main__":
    main()
