"""Which sampler when: every method on one model, time to 400 ESS and error against a reference.

Cases (`--cases`): the nonlinear growth model (T = 50, one static), stochastic volatility at
T = 100 and T = 1000 (three statics), and a hierarchical growth model (10 series, a per-series
sv and two shared hyperparameters: 12 statics). Methods, all run in this one process:

* `nuts_latent`: NUTS over the statics and every latent state (non-centred where it helps);
  the user's alternative to a particle filter.
* `nuts_fixed_key`: NUTS on `particle_factor` with diffusion resampling and one frozen filter
  key (the package's older route): a surrogate posterior, biased at small N.
* `pmmh`: `ndr.infer.PMMH` on `particle_factor(..., resampler=systematic())` (a fresh key per
  proposal); `pmmh_noise`: the same on `noise="sampled"` (fresh standard normals, the filter
  driven by them); `cpmmh`: `ndr.infer.CorrelatedPMMH` (rho = 0.99) on `noise="sampled"`.
* `pm_hmc`: NUTS on the statics and the filter's noise through `particle_factor(...,
  noise="sampled", resampler=diffusion(num_steps=4))`: pseudo-marginal HMC (smooth in both,
  consistent, not unbiased).
* `particles_pmmh`: PMMH of the NumPy library `particles` (0.4, adaptive random walk, one
  chain), the outside reference, where it is installed. It declares numpy < 2; install it
  without letting pip downgrade numpy (which breaks jax):
  `pip install --no-deps particles==0.4 numba llvmlite joblib` (its filter runs under numpy 2;
  only `PMMH.compute_post` needs the one-line fix in `run_particles`).

Protocol (`fit`): warm-up (compilation included) timed apart from sampling; time to 400 ESS
is warm-up seconds + sampling seconds x 400 / (smallest bulk ESS over the statics, all chains
together); errors are (posterior mean - reference mean) / reference SD per static. References
are long runs of an exact method, stored in the JSON and reused with `--reuse-references`.

    python -m benchmarks which_method [--quick] [--cases growth sv100 sv1000 hierarchical]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too

import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import markdown_table, run_metadata, write_report  # noqa: E402
from benchmarks._particles_library import run_particles  # noqa: E402
from benchmarks.models import (  # noqa: E402
    growth_factor_model,
    growth_latent_model,
    growth_observations,
    hierarchy_filter_model,
    hierarchy_latent_model,
    hierarchy_observations,
    hierarchy_quadrature,
    series_likelihood_table,
    stochastic_volatility,
    sv_factor_model,
    sv_latent_model,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "which_method.json"
TARGET_ESS = 400.0
SV_TRUE = {"mu": -1.0, "phi": 0.9, "sigma": 0.4}


# --- the cases: data, statics, reference and the model of each method ---------------------


def sv_returns(num_steps, seed=0):
    model = stochastic_volatility(SV_TRUE["mu"], SV_TRUE["phi"], SV_TRUE["sigma"])
    return ndr.simulate(jax.random.PRNGKey(seed), model, num_steps)[1]


def sv_filter_model(num_particles, **factor_options):
    """`models.sv_factor_model` as a function of the data (what `MCMC.run` passes)."""
    return lambda returns: sv_factor_model(returns, num_particles=num_particles, **factor_options)()


def growth_filter_model(num_particles, resampler=None, **factor_options):
    """`models.growth_factor_model` as a function of the data (what `MCMC.run` passes)."""
    return lambda y: growth_factor_model(
        y, num_particles=num_particles, resampler=resampler, **factor_options
    )()


def case_settings(name, quick):
    """Data, statics, particle counts and chain lengths of one case."""
    scale = 0.1 if quick else 1.0

    def length(n):
        return max(int(n * scale), 50)

    if name == "growth":
        return {
            "data": growth_observations(),
            "statics": ("sv",),
            "latent": growth_latent_model,
            "filter": growth_filter_model,
            "num_particles": {
                "pmmh": 256,
                "cpmmh": 128,
                "nuts_fixed_key": 256,
                "particles": 256,
                "pm_hmc": 32,
            },
            "correlation": 0.9,
            # One static: the random walk's scale settles within a few hundred steps.
            "warmup": length(500),
            "samples": length(3000),
            "nuts": (length(300), length(300)),
            "particles_model": "growth",
            # NUTS on the fixed-key filter here took 2,062 s to 400 ESS at its best
            # (roughness.md); rerunning it costs more than the rest of the table together.
            # Pseudo-marginal HMC at N = 32 stuck in its chains' modes in a quick run
            # (results/pm_hmc_growth_quick.json: 4 x (50 + 50) draws in 847 s, R-hat 779).
            "skip": ("nuts_fixed_key", "pm_hmc"),
        }
    if name in ("sv100", "sv1000"):
        num_steps = 100 if name == "sv100" else 1000
        counts = {"pmmh": 32, "cpmmh": 16, "nuts_fixed_key": 64, "particles": 32, "pm_hmc": 32}
        if num_steps == 1000:
            counts = {"pmmh": 256, "cpmmh": 64, "nuts_fixed_key": 64, "pm_hmc": 64}
        return {
            "data": sv_returns(num_steps),
            "statics": ("mu", "phi", "sigma"),
            "latent": sv_latent_model(),
            "filter": sv_filter_model,
            "num_particles": counts,
            # Measured at T = 100, N = 16: min ESS 436 at rho = 0.9 against 148 at 0.99 for
            # the same draws (the noise then mixes too slowly); T = 1000 keeps the default.
            "correlation": 0.9 if num_steps == 100 else 0.99,
            "warmup": length(1000),
            "samples": length(6000),
            "nuts": (length(300), length(400)),
            "particles_model": "sv" if num_steps == 100 else None,
            # One fixed-key gradient at T = 1000 costs seconds (versus_latent_nuts.md).
            # Fresh noise at T = 1000 needs N near T (an SD of 3.8 at N = 64): `pmmh` shows
            # it at N = 256; `pmmh_noise` would only repeat it. Pseudo-marginal HMC there
            # moves 64,000 noise coordinates per gradient: out of this table's budget.
            "skip": ("nuts_fixed_key", "pmmh_noise", "pm_hmc") if num_steps == 1000 else (),
        }
    if name == "hierarchical":
        return {
            "data": hierarchy_observations(),
            "statics": ("m", "s", "z"),
            "latent": hierarchy_latent_model,
            "filter": hierarchy_filter_model,
            "num_particles": {"pmmh": 128, "cpmmh": 32, "nuts_fixed_key": 64, "pm_hmc": 16},
            "correlation": 0.9,
            "warmup": length(2000),
            "samples": length(10000),
            "nuts": (length(200), length(200)),
            "particles_model": None,
            # The growth model's two-mode states stall pseudo-marginal HMC (see "growth");
            # `pmmh_noise` would repeat `pmmh`. NUTS on the fixed-key diffusion filter of 10
            # series at N = 64 ran past 15 minutes in a quick run (4 x (25 + 25) draws).
            "skip": ("pm_hmc", "pmmh_noise", "nuts_fixed_key"),
        }
    raise ValueError(f"unknown case {name!r}")


# --- one protocol for every NumPyro method ----------------------------------------------------


def summarize(draws, statics, reference, seconds_warmup, seconds_sampling):
    """Means, SDs, ESS, R-hat and errors (in reference SDs) of the draws of every static."""
    rows, smallest, worst_rhat = {}, math.inf, 0.0
    for name in statics:
        values = np.asarray(draws[name], np.float64)  # (chains, draws, *shape)
        flat = values.reshape(values.shape[:2] + (-1,))
        for index in range(flat.shape[-1]):
            label = name if flat.shape[-1] == 1 else f"{name}[{index}]"
            chain = flat[..., index]
            ess = float(effective_sample_size(chain))
            rhat = float(split_gelman_rubin(chain)) if chain.shape[0] > 1 else float("nan")
            ref = reference.get(label) if reference else None
            error = None if ref is None else (chain.mean() - ref["mean"]) / ref["sd"]
            rows[label] = {
                "mean": float(chain.mean()),
                "sd": float(chain.std()),
                "ess": ess,
                "rhat": rhat,
                "error_in_sd": error,
            }
            smallest = min(smallest, ess)
            worst_rhat = max(worst_rhat, rhat) if math.isfinite(rhat) else worst_rhat
    errors = [abs(r["error_in_sd"]) for r in rows.values() if r["error_in_sd"] is not None]
    return {
        "warmup_seconds": seconds_warmup,
        "sampling_seconds": seconds_sampling,
        "min_ess": smallest,
        "max_rhat": worst_rhat if worst_rhat > 0 else None,  # None: one chain
        "max_abs_error_in_sd": max(errors) if errors else None,
        "seconds_to_400_ess": seconds_warmup + seconds_sampling * TARGET_ESS / max(smallest, 1.0),
        "statics": rows,
    }


def fit(kernel, data, statics, reference, *, warmup, samples, chains, chain_method, seed=0):
    """Warm up, then sample; time both (compilation in the warm-up) and summarise."""
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method=chain_method,
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.warmup(jax.random.PRNGKey(seed), data, collect_warmup=False)
    jax.block_until_ready(mcmc.post_warmup_state)
    seconds_warmup = time.perf_counter() - start
    start = time.perf_counter()
    mcmc.run(mcmc.post_warmup_state.rng_key, data)
    draws = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    seconds_sampling = time.perf_counter() - start
    return summarize(draws, statics, reference, seconds_warmup, seconds_sampling)


def run_method(method, case, reference, quick):
    n = case["num_particles"]
    common = {"statics": case["statics"], "reference": reference}
    pm = {"warmup": case["warmup"], "samples": case["samples"], "chains": 4}
    warmup, samples = case["nuts"]
    nuts = {"warmup": warmup, "samples": samples, "chains": 4, "chain_method": "sequential"}
    if method == "nuts_latent":
        out = fit(NUTS(case["latent"]), case["data"], **common, **nuts)
    elif method == "nuts_fixed_key":
        resampler = ndr.resampling.diffusion(num_steps=4)
        model = case["filter"](n["nuts_fixed_key"], key=jax.random.PRNGKey(7), resampler=resampler)
        out = fit(
            NUTS(model),
            case["data"],
            **common,
            warmup=warmup // 2,
            samples=samples // 2,
            chains=1,
            chain_method="sequential",
        )
    elif method == "pmmh":
        # Resampling only when the ESS falls below N / 2 keeps the estimate unbiased, costs
        # less and lowers its variance (what a PMMH user would pick; see docs/which-sampler.md).
        model = case["filter"](n["pmmh"], resampler=ndr.resampling.systematic(), ess_threshold=0.5)
        out = fit(ndr.infer.PMMH(model), case["data"], **common, **pm, chain_method="vectorized")
    elif method == "pmmh_noise":
        model = case["filter"](n["pmmh"], noise="sampled")
        out = fit(ndr.infer.PMMH(model), case["data"], **common, **pm, chain_method="vectorized")
    elif method == "cpmmh":
        model = case["filter"](n["cpmmh"], noise="sampled")
        out = fit(
            ndr.infer.CorrelatedPMMH(model, correlation=case["correlation"]),
            case["data"],
            **common,
            **pm,
            chain_method="vectorized",
        )
        out["correlation"] = case["correlation"]
    elif method == "pm_hmc":
        # Pseudo-marginal HMC: NUTS on the statics and the filter's noise, the diffusion
        # factor smooth in both (not unbiased: its bias against N is pm_hmc_bias.md).
        resampler = ndr.resampling.diffusion(num_steps=4)
        model = case["filter"](n["pm_hmc"], noise="sampled", resampler=resampler)
        out = fit(NUTS(model), case["data"], **common, **nuts)
    elif method == "particles_pmmh":
        draws, seconds_warmup, seconds_sampling = run_particles(case)
        out = summarize(draws, case["statics"], reference, seconds_warmup, seconds_sampling)
    else:
        raise ValueError(method)
    # Methods named apart from their particle count: the noise PMMH shares plain PMMH's.
    count = {"pmmh_noise": "pmmh", "particles_pmmh": "particles"}.get(method, method)
    out["num_particles"] = n.get(count)
    return out


# --- references ---------------------------------------------------------------------------------


def reference_posterior(name, case, quick):
    """A long exact run: NUTS over the latents (SV), a tabulated likelihood (hierarchical)."""
    if name == "growth":
        stored = json.loads((ROOT / "benchmarks" / "results" / "roughness.json").read_text())
        posterior = stored["reference"]["posterior"]
        return {"sv": {"mean": posterior["mean"], "sd": posterior["sd"]}}, (
            "quadrature on a 61-point grid of sv, likelihood averaged over 64 keys at N = 2048 "
            "(roughness.json)"
        )
    scale = 0.1 if quick else 1.0
    if name.startswith("sv"):
        kernel, method = NUTS(case["latent"]), "sequential"
        warmup, samples, what = int(1000 * scale), int(5000 * scale), "NUTS over the latents"
    else:
        # A random walk on 12 statics with the sum of 10 noisy estimates did not mix (PMMH at
        # N = 256, 8 chains x (3000 + 12000): min ESS 4, R-hat 150), nor did NUTS on the
        # tabulated likelihood (4 x (1000 + 5000): min ESS 2, R-hat 3.2). The series are
        # independent given their sv: each one's likelihood is tabulated on a grid of log
        # sv and the posterior moments come from quadrature (`hierarchy_quadrature`).
        grid = jnp.linspace(math.log(0.3), math.log(30.0), 121 if not quick else 31)
        counts = {"num_particles": 1024, "num_keys": 16} if not quick else {"num_particles": 64}
        table = series_likelihood_table(case["data"], grid, **counts)
        return hierarchy_quadrature(grid, table), (
            f"quadrature over (m, s, z) on each series' log-likelihood tabulated on "
            f"{grid.shape[0]} points of log sv in [log 0.3, log 30] (log-mean of 16 estimates "
            "at N = 1024, systematic) and interpolated"
        )
    chains = 4
    out = fit(
        kernel,
        case["data"],
        case["statics"],
        None,
        warmup=warmup,
        samples=samples,
        chains=chains,
        chain_method=method,
        seed=11,
    )
    reference = {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in out["statics"].items()}
    return reference, (
        f"{what}, {chains} chains x ({warmup} + {samples}), min ESS {out['min_ess']:.0f}, "
        f"max R-hat {out['max_rhat']:.3f}"
    )


# --- report ---------------------------------------------------------------------------------------


LABELS = {
    "nuts_latent": "NUTS over all latents",
    "nuts_fixed_key": "NUTS, fixed-key diffusion filter (K = 4)",
    "pmmh": "ndr.infer.PMMH (fresh key, systematic at ESS < N/2)",
    "pmmh_noise": "ndr.infer.PMMH (noise='sampled', rho = 0)",
    "cpmmh": "ndr.infer.CorrelatedPMMH",
    "particles_pmmh": "particles 0.4 PMMH (NumPy)",
    "pm_hmc": "NUTS on statics + noise (pseudo-marginal HMC, diffusion K = 4)",
}


def stored_fixed_key_growth():
    """The fixed-key NUTS route on the growth model at its best, as roughness.py measured it."""
    stored = json.loads((ROOT / "benchmarks" / "results" / "roughness.json").read_text())
    best = min(stored["nuts"], key=lambda run: abs(run["mean_error_in_reference_sd"]))
    seconds = best["seconds"] * TARGET_ESS / best["effective_sample_size"]
    return (
        f"Not rerun here: NUTS on the fixed-key filter ({best['name']}, N = "
        f"{best['num_particles']}) took {seconds:.0f} s to 400 ESS in roughness.json "
        f"({best['seconds']:.0f} s for {best['warmup']} + {best['samples']} draws, ESS "
        f"{best['effective_sample_size']:.0f}), error {best['mean_error_in_reference_sd']:.3f} "
        "reference SD."
    )


def render(report):
    lines = ["# Which sampler when", "", report["meta_line"], ""]
    for name, case in report["cases"].items():
        lines += [f"## {name}", "", f"Reference: {case['reference_method']}.", ""]
        if "stored" in case:
            lines += [case["stored"], ""]
        rows = []
        for method, result in case["methods"].items():
            if "error" in result:
                rows.append([LABELS[method], "-", "-", "-", "-", "-", result["error"][:60]])
                continue
            label = LABELS[method]
            if "correlation" in result:
                label += f" (rho = {result['correlation']})"
            rows.append(
                [
                    label,
                    result.get("num_particles"),
                    result["seconds_to_400_ess"],
                    result["min_ess"],
                    result["max_rhat"],
                    result["max_abs_error_in_sd"],
                    f"{result['warmup_seconds']:.1f} + {result['sampling_seconds']:.1f} s",
                ]
            )
        headers = [
            "method",
            "N",
            "s to 400 ESS",
            "min ESS",
            "max R-hat",
            "max |error| / ref SD",
            "warm-up + sampling",
        ]
        lines += [markdown_table(headers, rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short chains (a smoke run)")
    parser.add_argument("--cases", nargs="+", help="default: all four (quick: growth)")
    parser.add_argument("--methods", nargs="+", help="default: all (quick: the ndr kernels)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--reuse-references", action="store_true")
    parser.add_argument(
        "--references-only",
        action="store_true",
        help="compute and store the cases' references, run no method (not timed: may share "
        "the machine)",
    )
    args = parser.parse_args(argv)
    if args.cases is None:
        args.cases = ["growth"] if args.quick else ["growth", "sv100", "sv1000", "hierarchical"]
    if args.methods is None:
        args.methods = ["pmmh", "pmmh_noise", "cpmmh"] if args.quick else list(LABELS)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"cases": {}}
    report = {"meta": run_metadata(quick=args.quick), "cases": dict(previous.get("cases", {}))}
    for name in args.cases:
        case = case_settings(name, args.quick)
        stored = previous["cases"].get(name, {})
        if args.reuse_references and "reference" in stored:
            reference, how = stored["reference"], stored["reference_method"]
        else:
            reference, how = reference_posterior(name, case, args.quick)
        methods = dict(stored.get("methods", {})) if args.reuse_references else {}
        for method in [] if args.references_only else args.methods:
            if method == "particles_pmmh" and case["particles_model"] is None:
                continue
            if method in case.get("skip", ()):
                continue
            if method == "nuts_latent" and name in ("growth", "hierarchical") and args.quick:
                continue
            print(f"{name}: {method}", flush=True)
            try:
                methods[method] = run_method(method, case, reference, args.quick)
            except ImportError as error:
                methods[method] = {"error": f"not installed: {error}"}
            print(
                json.dumps({k: v for k, v in methods[method].items() if k != "statics"}), flush=True
            )
        report["cases"][name] = {
            "reference": reference,
            "reference_method": how,
            "methods": methods,
        }
        if name == "growth":
            report["cases"][name]["stored"] = stored_fixed_key_growth()
    report["meta_line"] = (
        f"{'Quick run' if args.quick else 'Run'} of `python -m benchmarks which_method`; "
        "times in seconds on this machine, every method in the same process."
    )
    print(write_report(args.out, report, render))
    return report


if __name__ == "__main__":
    main()
