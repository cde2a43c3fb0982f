r"""Long-run stability of NUTS through the diffusion particle factor.

Stochastic-volatility model, $t = 0, \dots, T-1$:

$$x_0 \sim N\big(\mu, \sigma^2 / (1 - \phi^2)\big), \quad
x_t = \mu + \phi (x_{t-1} - \mu) + \sigma \varepsilon_t, \quad
y_t \sim N\big(0, \exp(x_t / 2)^2\big),$$

with priors $\mu \sim N(0, 1)$, $(\phi + 1)/2 \sim \mathrm{Beta}(20, 1.5)$,
$\sigma \sim \mathrm{HalfNormal}(0.5)$ and data simulated at $\mu = -1$, $\phi = 0.95$,
$\sigma = 0.25$. The likelihood is `particle_factor` with the default diffusion resampler.

All chains run in one `MCMC.run` (`chain_method="parallel"`, one XLA host device per chain;
on a 2-core machine the chains share the cores), so the sampler is traced and compiled once.
A background thread reads the process's resident memory (`VmRSS`) every 0.2 s for the whole
run; the report gives it at each tenth of the run's wall time and the peak
(`ru_maxrss`), so memory that grows with the number of draws shows as a rising row.
Per chain: divergent transitions, draws with a non-finite value, non-finite potential energies,
mean leapfrog steps and posterior means. float32 (JAX's default).

Calling `MCMC.run` again on the same object is a different matter: NumPyro builds fresh
closures on every run, so each run re-traces and re-compiles the sampler, and JAX keeps the
compiled executables in its caches. The second table measures this: `--repeat-runs` runs of
one single-chain `MCMC` object (`--repeat-iterations` warm-up and as many draws each), the
resident memory after each, once keeping JAX's caches and once calling `jax.clear_caches()`
after every run.

Usage:
    python benchmarks/stability.py                  # 4 chains x (1000 warm-up + 1000 draws)
    python benchmarks/stability.py --quick --out /tmp/st.json   # smoke test, small T and N
"""

import argparse
import gc
import json
import resource
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

import numpyro_diffres as ndr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
from benchmarks._common import load_average, run_metadata, write_report  # noqa: E402
from benchmarks.models import stochastic_volatility  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "stability.json"
TRUE = {"mu": -1.0, "phi": 0.95, "sigma": 0.25}


def model(observations, num_particles):
    """NumPyro model: priors and the diffusion particle factor."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    phi = 2.0 * numpyro.sample("phi_unit", dist.Beta(20.0, 1.5)) - 1.0
    numpyro.deterministic("phi", phi)
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    ndr.particle_factor(
        "y", stochastic_volatility(mu, phi, sigma), observations, num_particles=num_particles
    )


def peak_rss_mb():
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    """Current resident set size (`VmRSS`) of this process in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS line in /proc/self/status")


class MemoryMonitor:
    """Samples `current_rss_mb()` every `interval` seconds on a daemon thread."""

    def __init__(self, interval=0.2):
        self.interval = interval
        self.samples = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - start, current_rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] + self.interval, current_rss_mb()))

    def at_fractions(self, fractions):
        """RSS (MiB) of the last sample at or before each fraction of the monitored time."""
        times = np.array([t for t, _ in self.samples])
        values = np.array([m for _, m in self.samples])
        total = times[-1]
        index = np.searchsorted(times, np.asarray(fractions) * total, side="right") - 1
        index = np.maximum(index, 0)
        return values[index].tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--num-steps", type=int, default=50, help="T")
    parser.add_argument("--num-particles", type=int, default=64, help="N")
    parser.add_argument(
        "--quick", action="store_true", help="2 chains x 10 + 10, T=8, N=8, one run per mode"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat-runs", type=int, default=7, help="runs of one MCMC object")
    parser.add_argument(
        "--repeat-iterations", type=int, default=10, help="warm-up (and draws) per repeated run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        # Smoke test: every single-chain run compiles its sampler afresh (about 15 s on 2
        # loaded cores), so one run per mode of the repeated-runs table.
        args.chains, args.warmup, args.samples = 2, 10, 10
        args.num_steps, args.num_particles = 8, 8
        args.repeat_runs, args.repeat_iterations = 1, 3
    # One CPU device per chain, for chain_method="parallel"; must precede JAX's first use.
    numpyro.set_host_device_count(args.chains)

    _, observations = ndr.simulate(
        jax.random.PRNGKey(args.seed), stochastic_volatility(**TRUE), args.num_steps
    )
    mcmc = MCMC(
        NUTS(model),
        num_warmup=args.warmup,
        num_samples=args.samples,
        num_chains=args.chains,
        chain_method="parallel",
        progress_bar=False,
    )
    meta = run_metadata(numpyro_version=numpyro.__version__, dtype=str(jnp.result_type(float)))
    rss_start = current_rss_mb()
    start = time.perf_counter()
    with MemoryMonitor() as monitor:
        mcmc.run(
            jax.random.PRNGKey(1000),
            observations,
            args.num_particles,
            extra_fields=("diverging", "num_steps", "potential_energy"),
        )
        # MCMC.run returns before the work is done (asynchronous dispatch): wait for the draws.
        samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
        extra = jax.block_until_ready(mcmc.get_extra_fields(group_by_chain=True))
    seconds = time.perf_counter() - start
    fractions = [i / 10 for i in range(11)]
    chains = []
    for chain in range(args.chains):
        values = np.stack([np.asarray(samples[k][chain]) for k in ("mu", "phi", "sigma")], axis=1)
        energy = np.asarray(extra["potential_energy"][chain])
        chains.append(
            {
                "chain": chain,
                "divergences": int(np.sum(extra["diverging"][chain])),
                "nan_draws": int(np.sum(~np.all(np.isfinite(values), axis=1))),
                "non_finite_potential": int(np.sum(~np.isfinite(energy))),
                "mean_leapfrog_steps": float(np.mean(extra["num_steps"][chain])),
                "posterior_mean": dict(
                    zip(("mu", "phi", "sigma"), np.mean(values, axis=0).tolist(), strict=True)
                ),
            }
        )
        print(json.dumps(chains[-1]), flush=True)

    report = {
        "meta": meta,
        "config": {
            "chains": args.chains,
            "chain_method": "parallel",
            "repeat_runs": args.repeat_runs,
            "repeat_iterations": args.repeat_iterations,
            "warmup": args.warmup,
            "samples": args.samples,
            "num_steps": args.num_steps,
            "num_particles": args.num_particles,
            "resampler": "diffusion()",
            "true": TRUE,
            "quick": args.quick,
        },
        # The load when the run of the first table ended (`meta` has it at the very end).
        "load_after_run": load_average(),
        "seconds": seconds,
        "rss_mb_before_run": rss_start,
        "rss_mb_at_tenths": dict(
            zip([f"{f:.1f}" for f in fractions], monitor.at_fractions(fractions), strict=True)
        ),
        "rss_samples": len(monitor.samples),
        "peak_rss_mb": peak_rss_mb(),
        "chains": chains,
    }
    print(json.dumps({k: report[k] for k in ("seconds", "rss_mb_at_tenths", "peak_rss_mb")}))
    report["repeated_runs"] = {
        mode: repeated_runs(
            observations,
            args.num_particles,
            args.repeat_runs,
            args.repeat_iterations,
            clear=mode == "clear_caches",
        )
        for mode in ("keep_caches", "clear_caches")
    }
    write_report(args.out, report, render)
    return report


def repeated_runs(observations, num_particles, runs, iterations, clear):
    """Resident memory after each of `runs` calls of `run` on one single-chain `MCMC` object."""
    mcmc = MCMC(NUTS(model), num_warmup=iterations, num_samples=iterations, progress_bar=False)
    rows = []
    for run in range(runs):
        start = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(2000 + run), observations, num_particles)
        jax.block_until_ready(mcmc.get_samples())
        if clear:
            jax.clear_caches()
        gc.collect()
        rows.append(
            {"run": run, "seconds": time.perf_counter() - start, "rss_mb": current_rss_mb()}
        )
        print(json.dumps({"clear_caches": clear, **rows[-1]}), flush=True)
    return rows


def render(report):
    """The markdown of a report: the long run's chains and memory, then the repeated runs."""
    meta = report["meta"]
    config = report["config"]
    tenths = report["rss_mb_at_tenths"]
    lines = [
        "# Stability: NUTS through the diffusion particle factor",
        "",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_count']} CPUs), jax "
        f"{meta['jax_version']}, numpyro {meta['numpyro_version']}, {meta['dtype']}; stochastic "
        f"volatility, T={config['num_steps']}, N={config['num_particles']}, "
        f"{config['chains']} chains x ({config['warmup']} warm-up + {config['samples']} draws) "
        f"in one `MCMC.run` (chain_method={config['chain_method']!r}); "
        f"{report['seconds']:.0f} s. Load average at start / end: "
        f"{meta['load_start']} / {report['load_after_run']}.",
        "",
        "| chain | divergences | NaN draws | non-finite potential | leapfrog steps "
        "| mu | phi | sigma |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["chains"]:
        m = c["posterior_mean"]
        lines.append(
            f"| {c['chain']} | {c['divergences']} | {c['nan_draws']} | "
            f"{c['non_finite_potential']} | {c['mean_leapfrog_steps']:.1f} | {m['mu']:.3f} | "
            f"{m['phi']:.3f} | {m['sigma']:.3f} |"
        )
    lines += [
        "",
        f"Resident memory (VmRSS, MiB, {report['rss_samples']} samples) before the run: "
        f"{report['rss_mb_before_run']:.0f}; at each tenth of the run's wall time:",
        "",
        "| " + " | ".join(tenths) + " |",
        "|" + "---:|" * len(tenths),
        "| " + " | ".join(f"{v:.0f}" for v in tenths.values()) + " |",
        "",
        f"Peak RSS of the process: {report['peak_rss_mb']:.0f} MiB.",
        "",
    ]
    repeated = report["repeated_runs"]
    lines += [
        "## Repeated runs of one MCMC object",
        "",
        f"One chain, {config['repeat_iterations']} warm-up + {config['repeat_iterations']} "
        "draws per run, after the run above in the same process. NumPyro re-traces and "
        "re-compiles the sampler on every run (hence the seconds); the resident memory (VmRSS) "
        "after each run, keeping JAX's caches or calling `jax.clear_caches()` after each run:",
        "",
        "| run | seconds | RSS MiB | seconds (cleared) | RSS MiB (cleared) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for kept, cleared in zip(repeated["keep_caches"], repeated["clear_caches"], strict=True):
        lines.append(
            f"| {kept['run']} | {kept['seconds']:.1f} | {kept['rss_mb']:.0f} | "
            f"{cleared['seconds']:.1f} | {cleared['rss_mb']:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
