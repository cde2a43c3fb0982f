"""Stochastic volatility: SVI, then NUTS started at the SVI solution, on a particle filter.

Simulated daily returns with a latent log-volatility that follows an AR(1) process,

    x_0 ~ N(mu, sigma^2 / (1 - phi^2)),  x_t = mu + phi (x_{t-1} - mu) + sigma eps_t,
    y_t ~ N(0, exp(x_t / 2)^2),

a nonlinear, non-Gaussian model with no exact likelihood. The likelihood of (mu, phi, sigma) is
the diffusion particle filter (`ndr.particle_factor`). Fitting goes in two stages:

1. SVI with an `AutoNormal` guide and Adam. The seed handler gives the filter a fresh key at each
   step, so the gradients are stochastic and unbiased for the fixed-N surrogate.
2. NUTS initialised at the guide's median (`init_to_value`). Under NUTS the filter key is fixed,
   so NUTS samples the smooth fixed-noise surrogate posterior; starting near the mode spares
   warm-up most of its search.

The figure shows the SVI and NUTS posteriors against the true values; the filtered
log-volatility (posterior mixture of the filtering distributions, recorded with
`particle_factor(..., record=True)`) and the smoothed one (posterior paths from
`sample_latent_paths`, one FFBSi path per posterior draw, so the band integrates over the
parameters) against the true path; and a forecast band for the log-volatility and the returns
over `--horizon` held-out steps. Runs in float32.

    python examples/stochastic_volatility.py [--num-steps 100] [--num-particles 64]
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
from numpyro.distributions import constraints
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

TRUE = {"mu": -1.0, "phi": 0.9, "sigma": 0.4}


def state_space_model(mu, phi, sigma):
    """The stochastic-volatility model as a `StateSpaceModel` (scalar state and observation)."""
    return ndr.StateSpaceModel(
        initial=dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)),
        transition=lambda x, t: dist.Normal(mu + phi * (x - mu), sigma),
        emission=lambda x, t: dist.Normal(0.0, jnp.exp(x / 2.0)),
    )


def model(returns, num_particles=64, record=False, predict=False, horizon=0):
    """Priors on (mu, phi, sigma) and the particle-filter likelihood of the returns.

    With `predict=True` (for `Predictive` only: under MCMC the sites would be recomputed at
    every draw) a smoothed log-volatility path and a `horizon`-step forecast are recorded.
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    # (phi + 1) / 2 ~ Beta(10, 1.5): persistent volatility is a priori likely (mean 0.74).
    phi = numpyro.sample(
        "phi",
        dist.TransformedDistribution(
            dist.Beta(10.0, 1.5),
            # The domain makes the support (-1, 1), so guides and NUTS stay inside it.
            dist.transforms.AffineTransform(-1.0, 2.0, domain=constraints.unit_interval),
        ),
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ssm = state_space_model(mu, phi, sigma)
    ndr.particle_factor("returns", ssm, returns, num_particles=num_particles, record=record)
    if predict:
        ndr.sample_latent_paths(
            "log_volatility",
            ssm,
            returns,
            num_particles=num_particles,
            num_steps_ahead=horizon,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=100, help="time steps T")
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--svi-steps", type=int, default=500)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--num-warmup", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--num-filtered", type=int, default=100, help="posterior draws to filter")
    parser.add_argument("--horizon", type=int, default=10, help="held-out steps to forecast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    data_key, svi_key, guide_key, nuts_key, filter_key = jax.random.split(
        jax.random.PRNGKey(args.seed), 5
    )
    all_states, all_returns = ndr.simulate(
        data_key, state_space_model(**TRUE), args.num_steps + args.horizon
    )
    states, returns = all_states[: args.num_steps], all_returns[: args.num_steps]
    held_out_states, held_out = all_states[args.num_steps :], all_returns[args.num_steps :]
    print(f"Stochastic volatility, T={args.num_steps}, N={args.num_particles} (float32).")

    guide = AutoNormal(model, init_loc_fn=init_to_median)
    svi = SVI(model, guide, optax.adam(args.learning_rate), Trace_ELBO())
    start = time.perf_counter()
    svi_result = svi.run(
        svi_key,
        args.svi_steps,
        returns,
        num_particles=args.num_particles,
        progress_bar=not args.no_progress,
    )
    svi_seconds = time.perf_counter() - start
    median = guide.median(svi_result.params)
    svi_samples = guide.sample_posterior(guide_key, svi_result.params, sample_shape=(1000,))
    print(
        f"SVI ({args.svi_steps} steps, {svi_seconds:.1f} s) median: "
        + ", ".join(f"{k}={float(v):.3f}" for k, v in median.items())
    )

    mcmc = MCMC(
        NUTS(model, init_strategy=init_to_value(values=median)),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        progress_bar=not args.no_progress,
    )
    start = time.perf_counter()
    mcmc.run(nuts_key, returns, num_particles=args.num_particles, extra_fields=("diverging",))
    samples = jax.block_until_ready(mcmc.get_samples())
    nuts_seconds = time.perf_counter() - start
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())

    results = {"svi_seconds": svi_seconds, "nuts_seconds": nuts_seconds}
    results["divergences"] = divergences
    print(f"\n{'':<6} {'true':>6} {'SVI median':>10} {'NUTS mean':>9} {'NUTS sd':>8}")
    for name, value in TRUE.items():
        results[f"{name}_svi"] = float(median[name])
        results[f"{name}_mean"] = float(samples[name].mean())
        results[f"{name}_sd"] = float(samples[name].std())
        print(
            f"{name:<6} {value:6.3f} {results[f'{name}_svi']:10.3f} "
            f"{results[f'{name}_mean']:9.3f} {results[f'{name}_sd']:8.3f}"
        )
    print(f"NUTS {nuts_seconds:.1f} s, {divergences} divergent transitions")

    # Filtering distributions at posterior draws; their mixture gives the band.
    stride = max(1, args.num_samples // args.num_filtered)
    thinned = {k: v[::stride] for k, v in samples.items()}
    sites = ["returns_filtered_mean", "returns_filtered_variance", "log_volatility_states"]
    sites += ["log_volatility_forecast", "log_volatility_forecast_observations"]
    filtered = Predictive(model, thinned, return_sites=sites)(
        filter_key,
        returns,
        num_particles=args.num_particles,
        record=True,
        predict=True,
        horizon=args.horizon,
    )
    means = np.asarray(filtered["returns_filtered_mean"])
    variances = np.asarray(filtered["returns_filtered_variance"])
    center = means.mean(0)
    spread = np.sqrt(variances.mean(0) + means.var(0))
    lower, upper = center - 1.96 * spread, center + 1.96 * spread
    true_path = np.asarray(states)
    results["coverage"] = float(np.mean((true_path >= lower) & (true_path <= upper)))
    results["filtered_rmse"] = float(np.sqrt(np.mean((center - true_path) ** 2)))
    # The RMSE of the best constant guess, the path's own mean: what the filter must beat.
    results["path_sd"] = float(true_path.std())
    print(
        f"filtered log-volatility: RMSE {results['filtered_rmse']:.3f} against the true path "
        f"(its SD: {results['path_sd']:.3f}), 95% band covers {100 * results['coverage']:.0f}% "
        "of it"
    )
    # Smoothed paths (one per posterior draw) and forecasts: bands from their quantiles.
    smoothed = np.asarray(filtered["log_volatility_states"])
    smoothed_band = np.percentile(smoothed, [2.5, 50, 97.5], axis=0)
    results["smoothed_rmse"] = float(np.sqrt(np.mean((smoothed.mean(0) - true_path) ** 2)))
    results["smoothed_coverage"] = float(
        np.mean((true_path >= smoothed_band[0]) & (true_path <= smoothed_band[2]))
    )
    future_states = np.asarray(filtered["log_volatility_forecast"])
    future_returns = np.asarray(filtered["log_volatility_forecast_observations"])
    state_forecast_band = np.percentile(future_states, [5, 50, 95], axis=0)
    return_forecast_band = np.percentile(future_returns, [5, 95], axis=0)
    held_out = np.asarray(held_out)
    results["forecast_coverage"] = float(
        np.mean((held_out >= return_forecast_band[0]) & (held_out <= return_forecast_band[1]))
    )
    print(
        f"smoothed log-volatility: RMSE {results['smoothed_rmse']:.3f}, 95% band covers "
        f"{100 * results['smoothed_coverage']:.0f}% of the true path; the 90% forecast band "
        f"covers {100 * results['forecast_coverage']:.0f}% of the {args.horizon} held-out returns"
    )

    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(3, 3, height_ratios=[1.1, 0.7, 1.2])
    for column, name in enumerate(TRUE):
        ax = fig.add_subplot(grid[0, column])
        nuts_draws, svi_draws = np.asarray(samples[name]), np.asarray(svi_samples[name])
        both = np.concatenate([nuts_draws, svi_draws])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 35)
        ax.hist(svi_draws, bins=bins, density=True, alpha=0.4, label="SVI (AutoNormal)")
        ax.hist(nuts_draws, bins=bins, density=True, histtype="step", lw=2, label="NUTS")
        ax.axvline(TRUE[name], color="k", ls="--", label="true value")
        ax.set_xlabel(name)
        ax.set_ylabel("posterior density")
    fig.axes[0].legend(fontsize=8)
    times = np.arange(args.num_steps)
    ahead = np.arange(args.num_steps, args.num_steps + args.horizon)
    ax = fig.add_subplot(grid[1, :])
    ax.plot(times, returns, color="0.3", lw=0.8)
    ax.fill_between(
        ahead, *return_forecast_band, color="tab:red", alpha=0.25, label="90% forecast band"
    )
    ax.plot(ahead, held_out, "o", color="tab:red", ms=3, label="held-out returns")
    ax.set_ylabel("return y_t")
    ax.set_title("simulated returns and the forecast of held-out ones", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax = fig.add_subplot(grid[2, :], sharex=ax)
    ax.fill_between(times, lower, upper, alpha=0.2, label="95% filtering band (posterior mixture)")
    ax.fill_between(
        times,
        smoothed_band[0],
        smoothed_band[2],
        color="tab:green",
        alpha=0.3,
        label="95% smoothed band (posterior paths)",
    )
    ax.plot(times, smoothed_band[1], color="tab:green", lw=1.5, label="smoothed median")
    ax.fill_between(
        ahead,
        state_forecast_band[0],
        state_forecast_band[2],
        color="tab:red",
        alpha=0.25,
        label="90% forecast band",
    )
    ax.plot(times, true_path, "k--", lw=1, label="true log-volatility")
    ax.plot(ahead, np.asarray(held_out_states), "k:", lw=1)
    ax.set_xlabel("time step t")
    ax.set_ylabel("log-volatility x_t")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.axvline(args.num_steps - 0.5, color="0.5", lw=0.8)
    fig.suptitle(
        f"Stochastic volatility (T={args.num_steps}, diffusion PF with N={args.num_particles}):"
        " SVI, then NUTS from the SVI median"
    )
    fig.tight_layout()
    path = args.out / "stochastic_volatility.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Figure saved: {path}")
    results["figure"] = str(path)
    return results


if __name__ == "__main__":
    main()
