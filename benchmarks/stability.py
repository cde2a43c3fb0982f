r"""Long-run stability of NUTS through the diffusion particle factor.

Stochastic-volatility model, $t = 0, \dots, T-1$:

$$x_0 \sim N\big(\mu, \sigma^2 / (1 - \phi^2)\big), \quad
x_t = \mu + \phi (x_{t-1} - \mu) + \sigma \varepsilon_t, \quad
y_t \sim N\big(0, \exp(x_t / 2)^2\big),$$

with priors $\mu \sim N(0, 1)$, $(\phi + 1)/2 \sim \mathrm{Beta}(20, 1.5)$,
$\sigma \sim \mathrm{HalfNormal}(0.5)$ and data simulated at $\mu = -1$, $\phi = 0.95$,
$\sigma = 0.25$. The likelihood is `particle_factor` with the default diffusion resampler.

Chains run one after another (the same compiled sampler, a fresh key each); after each chain
the script records its wall time, divergent transitions, draws with a non-finite value and the
process's peak resident memory (`resource.getrusage(...).ru_maxrss`): flat across chains means
no memory growth. NumPyro re-traces and re-compiles the sampler on every `MCMC.run`, so each
chain's time includes a compile and the first chains' peak includes compile caches.
float32 (JAX's default).

Usage:
    python benchmarks/stability.py                  # 4 chains x (1000 warm-up + 1000 draws)
    python benchmarks/stability.py --quick --out /tmp/st.json   # smoke test, small T and N
"""

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

import numpyro_diffres as ndr

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "stability.json"
TRUE = {"mu": -1.0, "phi": 0.95, "sigma": 0.25}


def volatility(mu, phi, sigma):
    """The stochastic-volatility `StateSpaceModel`."""
    return ndr.StateSpaceModel(
        dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)),
        lambda x, t: dist.Normal(mu + phi * (x - mu), sigma),
        lambda x, t: dist.Normal(0.0, jnp.exp(x / 2.0)),
    )


def model(observations, num_particles):
    """NumPyro model: priors and the diffusion particle factor."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    phi = 2.0 * numpyro.sample("phi_unit", dist.Beta(20.0, 1.5)) - 1.0
    numpyro.deterministic("phi", phi)
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    ndr.particle_factor("y", volatility(mu, phi, sigma), observations, num_particles=num_particles)


def peak_rss_mb():
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--num-steps", type=int, default=50, help="T")
    parser.add_argument("--num-particles", type=int, default=64, help="N")
    parser.add_argument("--quick", action="store_true", help="2 chains x 20 + 20, T=15, N=16")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.chains, args.warmup, args.samples = 2, 20, 20
        args.num_steps, args.num_particles = 15, 16

    _, observations = ndr.simulate(
        jax.random.PRNGKey(args.seed), volatility(**TRUE), args.num_steps
    )
    # Data and N are bound here, not passed to `run`: with arguments, MCMC re-traces and
    # re-compiles the sampler on every `run`, whose compile caches would look like growth.
    kernel = NUTS(functools.partial(model, observations, args.num_particles))
    mcmc = MCMC(
        kernel,
        num_warmup=args.warmup,
        num_samples=args.samples,
        num_chains=1,
        progress_bar=False,
    )
    start = time.perf_counter()
    load_start = os.getloadavg()
    rss_start = peak_rss_mb()
    chains = []
    for chain in range(args.chains):
        chain_start = time.perf_counter()
        mcmc.run(
            jax.random.PRNGKey(1000 + chain),
            extra_fields=("diverging", "num_steps", "potential_energy"),
        )
        samples = mcmc.get_samples()
        extra = mcmc.get_extra_fields()
        values = np.stack([np.asarray(samples[k]) for k in ("mu", "phi", "sigma")], axis=1)
        energy = np.asarray(extra["potential_energy"])
        chains.append(
            {
                "chain": chain,
                "seconds": time.perf_counter() - chain_start,
                "divergences": int(np.sum(extra["diverging"])),
                "nan_draws": int(np.sum(~np.all(np.isfinite(values), axis=1))),
                "non_finite_potential": int(np.sum(~np.isfinite(energy))),
                "mean_leapfrog_steps": float(np.mean(extra["num_steps"])),
                "posterior_mean": dict(
                    zip(("mu", "phi", "sigma"), np.mean(values, axis=0).tolist(), strict=True)
                ),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        print(json.dumps(chains[-1]), flush=True)

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "python": sys.version.split()[0],
        "dtype": str(jnp.result_type(float)),
        "config": {
            "chains": args.chains,
            "warmup": args.warmup,
            "samples": args.samples,
            "num_steps": args.num_steps,
            "num_particles": args.num_particles,
            "resampler": "diffusion()",
            "true": TRUE,
            "quick": args.quick,
        },
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb_before_sampling": rss_start,
        "chains": chains,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out.with_suffix(".md"))
    return report


def write_markdown(report, path):
    config = report["config"]
    lines = [
        "# Stability: NUTS through the diffusion particle factor",
        "",
        f"Run {report['date']} on {report['platform']} ({report['cpus']} CPUs), jax "
        f"{report['jax']}, numpyro {report['numpyro']}, {report['dtype']}; stochastic "
        f"volatility, T={config['num_steps']}, N={config['num_particles']}, "
        f"{config['chains']} chains x ({config['warmup']} warm-up + {config['samples']} draws), "
        f"run one after another; total {report['seconds']:.0f} s. Load average at start / end: "
        f"{report['load_average_start']} / {report['load_average_end']}. Peak RSS before "
        f"sampling {report['peak_rss_mb_before_sampling']:.0f} MiB.",
        "",
        "| chain | seconds | divergences | NaN draws | non-finite potential | leapfrog steps "
        "| mu | phi | sigma | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["chains"]:
        m = c["posterior_mean"]
        lines.append(
            f"| {c['chain']} | {c['seconds']:.0f} | {c['divergences']} | {c['nan_draws']} | "
            f"{c['non_finite_potential']} | {c['mean_leapfrog_steps']:.1f} | {m['mu']:.3f} | "
            f"{m['phi']:.3f} | {m['sigma']:.3f} | {c['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
