"""One NumPyro model function, fitted two ways: NUTS over all latents, or `marginalize` + NUTS.

Two models. Stochastic volatility, where NUTS over the latents is at its best, and the
nonlinear growth model of `roughness.py`, where it is not (each state's sign is ambiguous
under y = x^2/20: a multimodal latent posterior).

The stochastic-volatility model is written once as an ordinary NumPyro program (statics, a
non-centred latent log-volatility path in a `scan`). (a) NUTS samples the statics and all
T latent innovations; (b) `ndr.marginalize(model, num_particles=N)` integrates the path out
with the diffusion-resampled particle filter and NUTS samples the three statics only. Reported:
wall times (warm-up + sampling, compilation included), the smallest effective sample size of
the statics, the time to 400 effective samples (warm-up + sampling time scaled to 400
ESS), and the agreement of the statics' posteriors (mean difference in posterior SDs of (a),
SD ratio).

Growth model (T = 50, the data of `roughness.py`): the same two fits of one NumPyro program
(centred latent path; (b) with the configuration `roughness.py` found smooth for a bootstrap
filter, `gradient_decay(diffusion(), 0)`, N = 256), each against the reference posterior of
$s_v$ stored in `results/roughness.json` (quadrature of the likelihood averaged over many keys
of N = 2048 filters): error of the posterior mean in reference SDs, SD ratio, divergences and
time to 400 effective samples.

    python benchmarks/versus_latent_nuts.py [--quick] [--out PATH] [--figure PATH]
    python benchmarks/versus_latent_nuts.py --models growth   # rerun one model, keep the other
    python benchmarks/versus_latent_nuts.py --models rule     # the N rule on the stored cases

The `rule` section applies the package's rule for N (log-likelihood SD over keys about 1 at a
posterior point: `diagnostics.choose_marginal_num_particles`) to each stored SV case,
at the posterior mean of the fit over all latents, and times one compiled gradient of the
marginal log-density at the N it picks. From that time it projects (does not run) the
particle fit's wall time at the leapfrog steps per iteration measured in the case's own
particle fit: what issue 16's long-series fit at the rule's N would cost on this machine.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

import numpyro_diffres as ndr
from numpyro_diffres import resampling
from numpyro_diffres.marginalize import marginalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
from benchmarks._common import (  # noqa: E402
    load_average,
    load_line,
    markdown_table,
    run_metadata,
    write_report,
)
from benchmarks.models import (  # noqa: E402
    growth_latent_model,
    growth_observations,
    stochastic_volatility,
    sv_latent_model,
)

STATICS = ("mu", "phi", "sigma")
TRUE = {"mu": -1.0, "phi": 0.9, "sigma": 0.4}
RESULTS = Path(__file__).resolve().parent / "results" / "versus_latent_nuts.json"
ROUGHNESS = Path(__file__).resolve().parent / "results" / "roughness.json"
MODELS = ("sv", "growth", "rule")
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "from_numpyro.png"


# One NumPyro program, fitted both ways (statics, then a non-centred latent path).
sv_program = sv_latent_model()


def simulate_returns(num_steps: int, seed: int):
    model = stochastic_volatility(TRUE["mu"], TRUE["phi"], TRUE["sigma"])
    return ndr.simulate(jax.random.PRNGKey(seed), model, num_steps)[1]


def fit(model, returns, *, num_warmup, num_samples, seed, statics=STATICS):
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples, progress_bar=False)
    key = jax.random.PRNGKey(seed)
    start = time.perf_counter()
    mcmc.warmup(key, returns, collect_warmup=False)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    mcmc.run(mcmc.post_warmup_state.rng_key, returns, extra_fields=("diverging", "num_steps"))
    samples = {name: np.asarray(mcmc.get_samples()[name]) for name in statics}
    sampling_seconds = time.perf_counter() - start
    ess = {
        name: float(effective_sample_size(samples[name][None].astype(np.float64)))
        for name in statics
    }
    divergences = int(np.sum(np.asarray(mcmc.get_extra_fields()["diverging"])))
    minimum = min(ess.values())
    return {
        "num_warmup": num_warmup,
        "num_samples": num_samples,
        "warmup_seconds": warmup_seconds,
        "sampling_seconds": sampling_seconds,
        "total_seconds": warmup_seconds + sampling_seconds,
        "ess": ess,
        "min_ess": minimum,
        "seconds_to_400_ess": warmup_seconds + sampling_seconds * 400.0 / minimum,
        "divergences": divergences,
        "mean_leapfrog_steps": float(np.mean(np.asarray(mcmc.get_extra_fields()["num_steps"]))),
        "mean": {name: float(samples[name].mean()) for name in statics},
        "sd": {name: float(samples[name].std()) for name in statics},
    }, samples


def log_likelihood_sd(model, returns, point, num_particles, num_keys=8):
    """SD over keys of the marginal log-likelihood estimate at `point` (the statics).

    The package's rule for N (`ndr.diagnostics.choose_num_particles`) aims at an SD of about 1:
    under NUTS the fixed key freezes one draw of this noise.
    """
    values = {name: jnp.asarray(point[name], jnp.float32) for name in STATICS}
    marginal = marginalize(model, num_particles=num_particles)

    @jax.jit
    def log_likelihood(key):
        # The priors' part of the log-density does not depend on the key.
        return log_density(handlers.seed(marginal, key), (returns,), {}, values)[0]

    estimates = [float(log_likelihood(jax.random.PRNGKey(k))) for k in range(num_keys)]
    return float(np.std(estimates, ddof=1))


def run_case(num_steps, settings, seed):
    returns = simulate_returns(num_steps, seed)
    latent, latent_samples = fit(
        sv_program,
        returns,
        num_warmup=settings["latent_warmup"],
        num_samples=settings["latent_samples"],
        seed=seed + 1,
    )
    marginal, marginal_samples = fit(
        marginalize(sv_program, num_particles=settings["num_particles"]),
        returns,
        num_warmup=settings["marginal_warmup"],
        num_samples=settings["marginal_samples"],
        seed=seed + 2,
    )
    agreement = {
        name: {
            "mean_difference_in_sd": (marginal["mean"][name] - latent["mean"][name])
            / latent["sd"][name],
            "sd_ratio": marginal["sd"][name] / latent["sd"][name],
        }
        for name in STATICS
    }
    case = {
        "num_steps": num_steps,
        "num_particles": settings["num_particles"],
        "log_likelihood_sd": log_likelihood_sd(
            sv_program, returns, latent["mean"], settings["num_particles"]
        ),
        "latent_nuts": latent,
        "marginalize_nuts": marginal,
        "agreement": agreement,
        "time_to_400_ess_ratio": marginal["seconds_to_400_ess"] / latent["seconds_to_400_ess"],
    }
    return case, (latent_samples, marginal_samples)


def rule_for_n(case, settings):
    """The package's N rule on one stored case, one timed gradient there, and a projection.

    `ndr.diagnostics.choose_marginal_num_particles` on the program, at the posterior mean of
    the fit over all latents, from the case's N (8 keys, up to
    `settings["rule_max_particles"]`).
    """
    returns = simulate_returns(case["num_steps"], 0)
    point = case["latent_nuts"]["mean"]
    values = {name: jnp.asarray(point[name], jnp.float32) for name in STATICS}
    choice = ndr.diagnostics.choose_marginal_num_particles(
        jax.random.PRNGKey(0),
        sv_program,
        values,
        model_args=(returns,),
        initial=case["num_particles"],
        max_particles=settings["rule_max_particles"],
        num_keys=8,
    )
    print(f"rule, T={case['num_steps']}: {choice}", flush=True)
    marginal = marginalize(sv_program, num_particles=choice.num_particles)

    @jax.jit
    def value_and_grad(values):
        # The marginal log-density the NUTS potential differentiates (fixed key).
        return jax.value_and_grad(
            lambda v: log_density(handlers.seed(marginal, 0), (returns,), {}, v)[0]
        )(values)

    start = time.perf_counter()
    jax.block_until_ready(value_and_grad(values))
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(value_and_grad(values))
    gradient_seconds = time.perf_counter() - start
    fitted = case["marginalize_nuts"]
    iterations = fitted["num_warmup"] + fitted["num_samples"]
    projected = iterations * fitted["mean_leapfrog_steps"] * gradient_seconds
    return {
        "num_steps": case["num_steps"],
        "tried": choice.tried,
        "num_particles": choice.num_particles,
        "sd": choice.sd,
        "reached": choice.reached,
        "compile_and_first_seconds": first_seconds,
        "gradient_seconds": gradient_seconds,
        "fitted_num_particles": case["num_particles"],
        "iterations": iterations,
        "leapfrog_per_iteration": fitted["mean_leapfrog_steps"],
        "projected_fit_seconds": projected,
        "fitted_seconds": fitted["total_seconds"],
        "latent_seconds": case["latent_nuts"]["total_seconds"],
    }


def render_rule(section):
    """The N-rule section of the report."""
    lines = [
        "",
        "## The N rule on these series, and what a fit at its N would cost",
        "",
        "The package's rule for N, `ndr.diagnostics.choose_marginal_num_particles` on the "
        "program (log-likelihood SD over 8 keys at most 1 at the posterior mean of the fit "
        "over all latents; N doubled, or raised to the next power of two at or above N "
        "sd^2), applied to each case above, and one compiled `value_and_grad` of "
        "the marginal log-density timed at the N it picks (the second call; the first "
        "includes compilation). *Projected* fit time = the particle fit's iterations x its "
        "measured leapfrog steps per iteration (at the N of the table above) x that gradient "
        "time: an estimate, not a run.",
        "",
    ]
    rows = []
    for row in section["rows"]:
        rows.append(
            [
                str(row["num_steps"]),
                ", ".join(f"{n}: {sd:.2f}" for n, sd in row["tried"]),
                str(row["num_particles"]) + ("" if row["reached"] else " (cap)"),
                row["gradient_seconds"],
                row["compile_and_first_seconds"],
                f"{row['iterations']} x {row['leapfrog_per_iteration']:.1f}",
                row["projected_fit_seconds"],
                row["latent_seconds"],
            ]
        )
    lines.append(
        markdown_table(
            [
                "T",
                "N: log-lik SD tried",
                "rule's N",
                "s per gradient",
                "compile + first s",
                "iterations x leapfrog",
                "projected fit s",
                "NUTS over latents s",
            ],
            rows,
            align="llrrrrrr",
        )
    )
    lines += [
        "",
        f"N-rule section run {section['date']}: {section['seconds']:.0f} s, load average "
        f"{section['load_start']} at start, {section['load_end']} at end.",
    ]
    return lines


def run_growth(settings, seed):
    """Both fits of the growth program, against the stored reference posterior of sv.

    The particle fit runs first; NUTS over the latents gets the same 300 + 400 iterations
    (the particle fit takes most of the time: a first run was stopped after 48 minutes).
    """
    observations = growth_observations(settings["growth_steps"])
    marginal, _ = fit(
        marginalize(
            growth_latent_model,
            num_particles=settings["growth_particles"],
            resampler=resampling.gradient_decay(resampling.diffusion(), 0.0),
        ),
        observations,
        num_warmup=settings["marginal_warmup_growth"],
        num_samples=settings["marginal_samples_growth"],
        seed=seed + 2,
        statics=("sv",),
    )
    print("growth, marginalize + NUTS:", marginal, flush=True)
    latent, _ = fit(
        growth_latent_model,
        observations,
        num_warmup=settings["marginal_warmup_growth"],
        num_samples=settings["marginal_samples_growth"],
        seed=seed + 1,
        statics=("sv",),
    )
    case = {
        "num_steps": settings["growth_steps"],
        "num_particles": settings["growth_particles"],
        "latent_nuts": latent,
        "marginalize_nuts": marginal,
    }
    if settings["growth_steps"] == json.loads(ROUGHNESS.read_text())["config"]["num_steps"]:
        reference = json.loads(ROUGHNESS.read_text())["reference"]["posterior"]
        case["reference"] = {"mean": reference["mean"], "sd": reference["sd"]}
        for result in (latent, marginal):
            result["error_in_reference_sd"] = (result["mean"]["sv"] - reference["mean"]) / (
                reference["sd"]
            )
            result["sd_ratio_to_reference"] = result["sd"]["sv"] / reference["sd"]
    return case


def render_growth(case):
    """The growth model's section of the report."""
    lines = [
        "",
        "## A model where NUTS over the latents fails: nonlinear growth",
        "",
        f"The growth model of `roughness.py` (T = {case['num_steps']}, data simulated at "
        "sv = sqrt(10)) written once as a NumPyro program with a centred latent path. (a) NUTS "
        "over sv and all latent states; (b) `ndr.marginalize(model, num_particles="
        f"{case['num_particles']}, resampler=gradient_decay(diffusion(), 0))` and NUTS over sv "
        "only. One chain each, float32.",
    ]
    reference = case.get("reference")
    if reference:
        lines.append(
            f"Reference posterior of sv (results/roughness.json): mean {reference['mean']:.3f},"
            f" SD {reference['sd']:.3f}."
        )
    lines.append("")
    rows = []
    for label, key in (
        ("NUTS, all latents", "latent_nuts"),
        ("marginalize + NUTS", "marginalize_nuts"),
    ):
        result = case[key]
        rows.append(
            [
                label,
                f"{result['num_warmup']} + {result['num_samples']}",
                result["total_seconds"],
                result["min_ess"],
                result["seconds_to_400_ess"],
                result["divergences"],
                result["mean_leapfrog_steps"],
                result["mean"]["sv"],
                result["sd"]["sv"],
                result.get("error_in_reference_sd"),
                result.get("sd_ratio_to_reference"),
            ]
        )
    lines.append(
        markdown_table(
            [
                "fit",
                "warm-up + samples",
                "s",
                "ESS of sv",
                "s to 400 ESS",
                "divergences",
                "leapfrog / iteration",
                "mean of sv",
                "SD of sv",
                "mean error / ref. SD",
                "SD / ref. SD",
            ],
            rows,
            align="lrrrrrrrrrr",
        )
    )
    return lines


def render(report):
    meta = report.get("sv_meta", report["meta"])
    lines = [
        "# One NumPyro model, two fits: NUTS over all latents vs `marginalize` + NUTS",
        "",
        "Stochastic volatility written once as a NumPyro `scan` program (non-centred latent "
        "path). (a) NUTS over the statics and all latent innovations; (b) "
        f"`ndr.marginalize(model, num_particles={meta['num_particles']})` (diffusion "
        "resampling, fixed key under NUTS) and NUTS over (mu, phi, sigma) only. One chain "
        "each, float32. Time to 400 ESS = warm-up + sampling time x 400 / (smallest ESS of "
        "the statics); wall times include compilation.",
        "",
    ]
    rows = []
    for case in report["cases"]:
        for label, key in (
            ("NUTS, all latents", "latent_nuts"),
            ("marginalize + NUTS", "marginalize_nuts"),
        ):
            result = case[key]
            rows.append(
                [
                    str(case["num_steps"]),
                    label,
                    f"{result['num_warmup']} + {result['num_samples']}",
                    result["warmup_seconds"],
                    result["sampling_seconds"],
                    result["min_ess"],
                    result["seconds_to_400_ess"],
                    result["divergences"],
                ]
            )
    lines.append(
        markdown_table(
            [
                "T",
                "fit",
                "warm-up + samples",
                "warm-up s",
                "sampling s",
                "min ESS",
                "s to 400 ESS",
                "divergences",
            ],
            rows,
            align="llrrrrrr",
        )
    )
    lines += ["", "Posterior agreement of the statics ((b) against (a)):", ""]
    rows = []
    for case in report["cases"]:
        for name in STATICS:
            latent, marginal = case["latent_nuts"], case["marginalize_nuts"]
            rows.append(
                [
                    str(case["num_steps"]),
                    name,
                    latent["mean"][name],
                    marginal["mean"][name],
                    latent["sd"][name],
                    marginal["sd"][name],
                    case["agreement"][name]["mean_difference_in_sd"],
                    case["agreement"][name]["sd_ratio"],
                ]
            )
    lines.append(
        markdown_table(
            [
                "T",
                "static",
                "mean (a)",
                "mean (b)",
                "SD (a)",
                "SD (b)",
                "mean diff / SD (a)",
                "SD ratio",
            ],
            rows,
            align="llrrrrrr",
        )
    )
    lines += [""]
    for case in report["cases"]:
        lines.append(
            f"T = {case['num_steps']}: time to 400 ESS, marginalize / all-latents = "
            f"{case['time_to_400_ess_ratio']:.2f}."
            + (
                f" Log-likelihood SD over 8 keys at (a)'s posterior mean with N = "
                f"{case['num_particles']}: {case['log_likelihood_sd']:.2f} (the N rule of "
                "`choose_num_particles` aims at 1)."
                if "log_likelihood_sd" in case
                else ""
            )
        )
    lines += ["", load_line(meta)]
    if report.get("growth"):
        growth = report["growth"]
        lines += render_growth(growth)
        lines += [
            "",
            f"Growth section run {growth['date']}: {growth['seconds']:.0f} s, load average "
            f"{growth['load_start']} at start, {growth['load_end']} at end.",
        ]
    if report.get("rule"):
        lines += render_rule(report["rule"])
    lines.append("")
    return "\n".join(lines)


def plot(path, returns, samples):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latent_samples, marginal_samples = samples
    figure, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    axes[0].plot(np.asarray(returns), lw=0.8, color="k")
    axes[0].set_title("returns")
    for ax, name in zip(axes[1:], STATICS, strict=True):
        bins = np.histogram_bin_edges(
            np.concatenate([latent_samples[name], marginal_samples[name]]), 30
        )
        ax.hist(latent_samples[name], bins, density=True, alpha=0.5, label="NUTS, all latents")
        ax.hist(marginal_samples[name], bins, density=True, alpha=0.5, label="marginalize + NUTS")
        ax.axvline(TRUE[name], color="k", ls="--", lw=1)
        ax.set_title(name)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=None, help="posterior figure (PNG)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="values of T (SV)")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated subset of sv,growth; the other's section is kept from --out",
    )
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if not models or set(models) - set(MODELS):
        parser.error(f"--models must be a comma-separated subset of {MODELS}, got {args.models}")
    if args.quick:
        settings = {
            "num_particles": 8,
            "latent_warmup": 50,
            "latent_samples": 50,
            "marginal_warmup": 20,
            "marginal_samples": 20,
            "growth_steps": 10,
            "growth_particles": 16,
            "marginal_warmup_growth": 50,
            "marginal_samples_growth": 50,
            "rule_max_particles": 16,
        }
        steps = args.steps or [15]
    else:
        settings = {
            "num_particles": 64,
            "latent_warmup": 1000,
            "latent_samples": 2000,
            "marginal_warmup": 200,
            "marginal_samples": 300,
            "growth_steps": 50,
            "growth_particles": 256,
            "marginal_warmup_growth": 300,
            "marginal_samples_growth": 400,
            "rule_max_particles": 4096,
        }
        steps = args.steps or [100]
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    report = {"meta": run_metadata(**settings, steps=steps, dtype="float32"), "cases": []}
    if "sv" in models:
        for num_steps in steps:
            case, samples = run_case(num_steps, settings, seed=0)
            report["cases"].append(case)
            print(
                f"T={num_steps}: ratio {case['time_to_400_ess_ratio']:.2f}",
                {k: round(v["mean_difference_in_sd"], 3) for k, v in case["agreement"].items()},
                flush=True,
            )
            if args.figure is not None and num_steps == steps[0]:
                plot(args.figure, simulate_returns(num_steps, 0), samples)
    elif previous.get("cases"):
        report["cases"] = previous["cases"]
        report["sv_meta"] = previous.get("sv_meta", previous["meta"])
    if "growth" in models:
        start, load_start = time.perf_counter(), load_average()
        date = run_metadata()["date"]
        report["growth"] = run_growth(settings, seed=0)
        report["growth"].update(
            date=date,
            load_start=load_start,
            load_end=load_average(),
            seconds=time.perf_counter() - start,
        )
        print(json.dumps(report["growth"], default=float), flush=True)
    elif previous.get("growth"):
        report["growth"] = previous["growth"]
    if "rule" in models:
        start, load_start = time.perf_counter(), load_average()
        date = run_metadata()["date"]
        report["rule"] = {
            "rows": [rule_for_n(case, settings) for case in report["cases"]],
            "date": date,
            "load_start": load_start,
            "load_end": load_average(),
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(report["rule"], default=float), flush=True)
    elif previous.get("rule"):
        report["rule"] = previous["rule"]
    print(write_report(args.out, report, render))


if __name__ == "__main__":
    main()
