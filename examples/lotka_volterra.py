"""A stochastic Lotka-Volterra model fitted to the Hudson's Bay Company lynx and hare records.

The data (`examples/data/hudson_bay_lynx_hare.csv`) are the company's pelt records 1900-1920 in
thousands, as tabulated by Odum (1953) and used in Carpenter's Stan case study
"Predator-Prey Population Dynamics". The latent state is the log-population
$z = (\\log u, \\log v)$ of hares $u$ and lynx $v$ (thousands). On the log scale the
Lotka-Volterra equations read

    d log u / dt = alpha - beta v = alpha (1 - v / v*),
    d log v / dt = delta u - gamma = gamma (u / u* - 1),

parametrised by the hare growth rate alpha, the lynx death rate gamma and the equilibrium
populations u* = gamma / delta and v* = alpha / beta (`hare_equilibrium`, `lynx_equilibrium`):
the classical (alpha, beta, gamma, delta) are strongly correlated a posteriori, which makes NUTS
take long trajectories; the equilibrium form is much closer to independent. beta and delta are
recorded as deterministic sites. The flow is integrated over one year by `--substeps` Euler
steps, and Gaussian process noise with scale `tau` is added once a year, so the populations
can drift off the deterministic cycle:

    z_t = Euler_1yr(z_{t-1}; alpha, gamma, u*, v*) + tau * eps_t.

Observation model: pelts_t ~ LogNormal(z_t, sigma) per species. The records are pelts in
thousands, continuous and positive rather than counts, so a Poisson likelihood does not fit; and
trapping error is multiplicative (a bad season loses a fraction of the catch, whatever its
size), which is what log-normal noise expresses. (The paper used Poisson emissions on simulated
counts.) The likelihood of the six parameters is the diffusion particle filter; NUTS (dense
mass matrix) samples its fixed-noise surrogate posterior, starting from a short SVI fit.

The last `--holdout` years are held out of the fit. The figure shows, mixed over the posterior,
the smoothed populations (posterior paths from `sample_latent_paths`: FFBSi paths given all
fitted records, one per posterior draw), a filtered predictive band for the pelt records over
the fitted years, a forecast band for the held-out records, and each parameter's posterior
against its prior.

    python examples/lotka_volterra.py [--num-particles 64] [--num-samples 300]
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import (
    MCMC,
    NUTS,
    SVI,
    Predictive,
    Trace_ELBO,
    init_to_median,
    init_to_value,
)
from numpyro.infer.autoguide import AutoNormal

import numpyro_diffres as ndr

DATA = Path(__file__).resolve().parent / "data" / "hudson_bay_lynx_hare.csv"
SPECIES = ("hare", "lynx")
DEFAULT_SUBSTEPS = 10
PRIORS = {
    "alpha": dist.LogNormal(jnp.log(0.7), 0.5),
    "gamma": dist.LogNormal(jnp.log(0.7), 0.5),
    "hare_equilibrium": dist.LogNormal(jnp.log(20.0), 1.0),
    "lynx_equilibrium": dist.LogNormal(jnp.log(20.0), 1.0),
    "tau": dist.LogNormal(-2.0, 1.0),
    "sigma": dist.LogNormal(-1.0, 1.0),
}
# Log-populations are clipped inside the drift only, so an outlying particle in warm-up cannot
# overflow exp(); e^10 times the equilibrium is far beyond anything in the data.
LOG_RATIO_LIMIT = 10.0


def load_data(path=DATA):
    """Years `(T,)` and pelts `(T, 2)` (hare, lynx; thousands) from the CSV."""
    table = np.loadtxt(path, delimiter=",", skiprows=2)
    return table[:, 0].astype(int), table[:, 1:3]


def yearly_drift(z, alpha, gamma, hare_equilibrium, lynx_equilibrium, substeps):
    """One year of the log-scale Lotka-Volterra flow by `substeps` Euler steps.

    With $\\beta = \\alpha / v^*$ and $\\delta = \\gamma / u^*$ the flow is
    $d\\log u/dt = \\alpha (1 - v / v^*)$, $d\\log v/dt = \\gamma (u / u^* - 1)$.
    """
    step = 1.0 / substeps
    log_equilibrium = jnp.log(jnp.stack([hare_equilibrium, lynx_equilibrium]))

    def euler(_, z):
        ratio = jnp.exp(jnp.clip(z - log_equilibrium, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        return z + step * jnp.stack([alpha * (1.0 - ratio[1]), gamma * (ratio[0] - 1.0)])

    return jax.lax.fori_loop(0, substeps, euler, z)


def state_space_model(
    alpha, gamma, hare_equilibrium, lynx_equilibrium, tau, sigma, substeps=DEFAULT_SUBSTEPS
):
    """The stochastic LV model with log-normal pelt records as a `StateSpaceModel`.

    The state at $t = 0$ has a vague prior and no record (see `model`). From $t = 1$ on the
    filter proposes from the locally optimal proposal: given the drift $m$ and the record
    $y_t$, the state is Gaussian in $\\log y_t$,
    $q(z_t) = N\\big((m/\\tau^2 + \\log y_t/\\sigma^2)\\,s^2,\\ s^2\\big)$ with
    $s^{-2} = \\tau^{-2} + \\sigma^{-2}$, and the weight $f g / q$ does not depend on the proposed
    state. The bootstrap filter degenerates when $\\sigma \\ll \\tau$ (a few particles land
    near each record), which makes its likelihood surface wiggly there and NUTS's step size
    collapse.
    """

    def drift(z):
        return yearly_drift(z, alpha, gamma, hare_equilibrium, lynx_equilibrium, substeps)

    def proposal(z, t, pelts):
        variance = 1.0 / (1.0 / tau**2 + 1.0 / sigma**2)
        mean = variance * (drift(z) / tau**2 + jnp.log(pelts) / sigma**2)
        return dist.Normal(mean, jnp.sqrt(variance)).to_event(1)

    return ndr.StateSpaceModel(
        initial=dist.Normal(jnp.full(2, jnp.log(10.0)), 1.0).to_event(1),
        transition=lambda z, t: dist.Normal(drift(z), tau).to_event(1),
        emission=lambda z, t: dist.LogNormal(z, sigma).to_event(1),
        proposal=proposal,
    )


def model(
    pelts, num_particles=64, substeps=DEFAULT_SUBSTEPS, record=False, predict=False, horizon=0
):
    """Priors on the six parameters and the particle-filter likelihood of the records.

    A missing record is put in front of the data, so the filter's first state is the year
    before the first record, drawn from its vague prior, and every record is met by the
    guided proposal (which only acts from the second state on). The recorded filtering
    moments therefore have one more row than `pelts`.

    The classical predation rates are recorded as deterministic sites:
    `beta` $= \\alpha / v^*$ and `delta` $= \\gamma / u^*$.

    With `predict=True` (for `Predictive` only) a smoothed log-population path (one more row
    than `pelts`, as above) and a `horizon`-year forecast are recorded.
    """
    values = {name: numpyro.sample(name, prior) for name, prior in PRIORS.items()}
    numpyro.deterministic("beta", values["alpha"] / values["lynx_equilibrium"])
    numpyro.deterministic("delta", values["gamma"] / values["hare_equilibrium"])
    padded = jnp.concatenate([jnp.full((1, pelts.shape[1]), jnp.nan, pelts.dtype), pelts])
    ssm = state_space_model(**values, substeps=substeps)
    ndr.particle_factor("pelts", ssm, padded, num_particles=num_particles, record=record)
    if predict:
        ndr.sample_latent_paths(
            "log_population", ssm, padded, num_particles=num_particles, num_steps_ahead=horizon
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument(
        "--substeps", type=int, default=DEFAULT_SUBSTEPS, help="Euler steps per year"
    )
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--num-warmup", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--num-filtered", type=int, default=100, help="posterior draws to filter")
    parser.add_argument("--holdout", type=int, default=4, help="final years held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    svi_key, nuts_key, filter_key, band_key = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    all_years, all_pelts = load_data()
    years, pelts_np = (
        all_years[: len(all_years) - args.holdout],
        all_pelts[: len(all_years) - args.holdout],
    )
    held_out_years, held_out = all_years[len(years) :], all_pelts[len(years) :]
    pelts = jnp.asarray(pelts_np, jnp.float32)
    settings = {"num_particles": args.num_particles, "substeps": args.substeps}
    print(
        f"Lynx-hare pelts {years[0]}-{years[-1]} ({len(years)} years), "
        f"diffusion PF with N={args.num_particles} (float32)."
    )

    guide = AutoNormal(model, init_loc_fn=init_to_median)
    svi = SVI(model, guide, optax.adam(args.learning_rate), Trace_ELBO())
    start = time.perf_counter()
    svi_result = svi.run(
        svi_key, args.svi_steps, pelts, progress_bar=not args.no_progress, **settings
    )
    svi_seconds = time.perf_counter() - start
    median = guide.median(svi_result.params)

    mcmc = MCMC(
        NUTS(model, init_strategy=init_to_value(values=median), dense_mass=True),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        progress_bar=not args.no_progress,
    )
    start = time.perf_counter()
    mcmc.run(nuts_key, pelts, extra_fields=("diverging", "num_steps"), **settings)
    samples = {k: np.asarray(v) for k, v in jax.block_until_ready(mcmc.get_samples()).items()}
    nuts_seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    divergences = int(extra["diverging"].sum())
    leapfrog_steps = float(np.mean(extra["num_steps"]))

    results = {"svi_seconds": svi_seconds, "nuts_seconds": nuts_seconds}
    results["divergences"] = divergences
    results["leapfrog_steps"] = leapfrog_steps
    print(f"\n{'':<16} {'SVI median':>10} {'mean':>8} {'sd':>8} {'5%':>8} {'95%':>8}")
    median = {**median, "beta": median["alpha"] / median["lynx_equilibrium"]}
    median["delta"] = median["gamma"] / median["hare_equilibrium"]
    for name in [*PRIORS, "beta", "delta"]:
        draws = samples[name]
        results[f"{name}_mean"] = float(draws.mean())
        results[f"{name}_sd"] = float(draws.std())
        low, high = np.percentile(draws, [5, 95])
        print(
            f"{name:<16} {float(median[name]):10.4f} {draws.mean():8.4f} {draws.std():8.4f} "
            f"{low:8.4f} {high:8.4f}"
        )
    print(
        f"SVI {args.svi_steps} steps {svi_seconds:.1f} s; NUTS {nuts_seconds:.1f} s, "
        f"{divergences} divergent transitions, {leapfrog_steps:.1f} leapfrog steps per draw"
    )

    # Filtering distributions of the log-populations at posterior draws; sampling from each
    # (and adding the observation noise) gives population and pelt-record bands.
    stride = max(1, args.num_samples // args.num_filtered)
    thinned = {k: v[::stride] for k, v in samples.items()}
    sites = ["pelts_filtered_mean", "pelts_filtered_variance", "log_population_states"]
    sites += ["log_population_forecast_observations"]
    filtered = Predictive(model, thinned, return_sites=sites)(
        filter_key, pelts, record=True, predict=True, horizon=args.holdout, **settings
    )
    # Row 0 is the year before the first record (see `model`).
    means = np.asarray(filtered["pelts_filtered_mean"])[:, 1:]
    scales = np.sqrt(np.asarray(filtered["pelts_filtered_variance"]))[:, 1:]
    draws_per_sample = 50
    noise = np.asarray(jax.random.normal(band_key, (2, draws_per_sample, *means.shape)))
    log_population = means + scales * noise[0]
    population = np.exp(log_population).reshape(-1, *means.shape[1:])
    sigma = thinned["sigma"][None, :, None, None]
    records = np.exp(log_population + sigma * noise[1]).reshape(-1, *means.shape[1:])
    population_bands = np.percentile(population, [5, 50, 95], axis=0)
    record_bands = np.percentile(records, [5, 95], axis=0)
    inside = (pelts_np >= record_bands[0]) & (pelts_np <= record_bands[1])
    results["record_coverage"] = float(inside.mean())
    print(f"90% filtered predictive band covers {100 * inside.mean():.0f}% of the records")
    # Smoothed populations (row 0 is the padding year) and the forecast of held-out records.
    smoothed_bands = np.percentile(
        np.exp(np.asarray(filtered["log_population_states"])[:, 1:]), [5, 50, 95], axis=0
    )
    if args.holdout > 0:
        forecast_bands = np.percentile(
            np.asarray(filtered["log_population_forecast_observations"]), [5, 50, 95], axis=0
        )
        covered = (held_out >= forecast_bands[0]) & (held_out <= forecast_bands[2])
        results["forecast_coverage"] = float(covered.mean())
        print(
            f"90% forecast band covers {100 * covered.mean():.0f}% of the "
            f"{2 * args.holdout} held-out records ({held_out_years[0]}-{held_out_years[-1]})"
        )

    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 6, height_ratios=[1.6, 1.0])
    colors = ("tab:blue", "tab:orange")
    for column, (name, color) in enumerate(zip(SPECIES, colors, strict=True)):
        ax = fig.add_subplot(grid[0, 3 * column : 3 * column + 3])
        ax.fill_between(
            years,
            *record_bands[:, :, column],
            color=color,
            alpha=0.15,
            label="90% band for the pelt record",
        )
        ax.fill_between(
            years,
            smoothed_bands[0, :, column],
            smoothed_bands[2, :, column],
            color=color,
            alpha=0.35,
            label="90% band for the population (smoothed)",
        )
        ax.plot(
            years,
            smoothed_bands[1, :, column],
            color=color,
            lw=1.5,
            label="smoothed population (median)",
        )
        ax.plot(
            years,
            population_bands[1, :, column],
            color=color,
            lw=1,
            ls=":",
            label="filtered population (median)",
        )
        ax.plot(years, pelts_np[:, column], "ko", ms=4, label="pelt records")
        if args.holdout > 0:
            ax.fill_between(
                held_out_years,
                forecast_bands[0, :, column],
                forecast_bands[2, :, column],
                color="tab:red",
                alpha=0.2,
                label="90% forecast band for the records",
            )
            ax.plot(held_out_years, forecast_bands[1, :, column], color="tab:red", lw=1)
            ax.plot(
                held_out_years,
                held_out[:, column],
                "x",
                color="tab:red",
                ms=6,
                label="held-out records",
            )
        ax.set_xlabel("year")
        ax.set_ylabel(f"{name} (thousands of pelts)")
        ax.set_title(f"{name}: smoothed given the fitted records, then forecast", fontsize=10)
        ax.set_xticks(all_years[::4])
        ax.legend(fontsize=8, loc="upper left")
    for column, (name, prior) in enumerate(PRIORS.items()):
        ax = fig.add_subplot(grid[1, column])
        draws = samples[name]
        low, high = np.percentile(draws, [0.5, 99.5])
        pad = 0.6 * (high - low)
        grid_values = np.linspace(max(low - pad, 1e-6), high + pad, 200)
        ax.hist(draws, bins=30, density=True, alpha=0.5, color="tab:green", label="posterior")
        ax.plot(grid_values, np.exp(prior.log_prob(grid_values)), "k--", lw=1, label="prior")
        ax.set_xlabel(name)
        ax.set_yticks([])
    fig.axes[2].set_ylabel("density")
    fig.axes[2].legend(fontsize=8)
    fig.suptitle(
        "Stochastic Lotka-Volterra on log scale fitted to Hudson's Bay Company records "
        f"(diffusion PF, guided proposal, N={args.num_particles}, NUTS)"
    )
    fig.tight_layout()
    path = args.out / "lotka_volterra.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Figure saved: {path}")
    results["figure"] = str(path)
    return results


if __name__ == "__main__":
    main()
