"""Why diffusion resampling: the fixed-key log-likelihood along one parameter, per resampler.

The linear-Gaussian model of the paper's App. I,

    x_0 ~ N(0, 1),  x_t = theta_1 x_{t-1} + N(0, 1),  y_t = theta_2 x_t + N(0, 0.5),

is simulated at theta = (0.5, 1.0). With ONE fixed PRNG key (what NUTS sees: `numpyro.prng_key()`
is constant across potential evaluations), the particle-filter log-likelihood is evaluated on a
fine grid of theta_1 for every resampler in the package, next to the exact Kalman curve. Index
resampling (multinomial, systematic, and stop-gradient, whose value is the systematic one) jumps
whenever an ancestor index flips, and so does soft resampling, which still draws indices. The
other three are smooth in theta under a fixed key: Gumbel-softmax (a fixed Gumbel draw makes a
smooth softmax), entropic optimal transport and diffusion. Smooth is not the same as accurate:
all three are biased for finite N, and the panels show how far each curve sits below the exact
one (the log of an unbiased estimate is biased low too, so an offset alone is expected).

Roughness is measured as the median |difference between neighbouring grid values|; the exact
curve sets the scale a smooth estimate should have. The script prints it per method and saves
one figure with a panel per resampler.

    python examples/why_diffusion.py [--num-steps 50] [--num-particles 64] [--num-grid 201]
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import numpyro_diffres as ndr
from numpyro_diffres import resampling

TRUE_THETA = (0.5, 1.0)
EMISSION_VARIANCE = 0.5


def resamplers():
    """Every resampler in the package, with its default settings, by display name."""
    return {
        "diffusion": resampling.diffusion(),
        "multinomial": resampling.multinomial(),
        "systematic": resampling.systematic(),
        "stop_gradient": resampling.stop_gradient(),
        "soft": resampling.soft(),
        "gumbel_softmax": resampling.gumbel_softmax(),
        "optimal_transport": resampling.optimal_transport(),
    }


def params(theta_1, theta_2):
    """Matrices of the scalar model as `LinearGaussianParams` (state and observation `(1,)`)."""
    eye = jnp.eye(1)
    return ndr.LinearGaussianParams(
        jnp.zeros(1), eye, theta_1 * eye, eye, theta_2 * eye, EMISSION_VARIANCE * eye
    )


def state_space_model(theta_1, theta_2):
    """The same model with scalar states, as a `StateSpaceModel`."""
    emission_scale = jnp.sqrt(EMISSION_VARIANCE)
    return ndr.StateSpaceModel(
        initial=dist.Normal(0.0, 1.0),
        transition=lambda x, t: dist.Normal(theta_1 * x, 1.0),
        emission=lambda x, t: dist.Normal(theta_2 * x, emission_scale),
    )


def median_step(values):
    """Median absolute difference between neighbouring grid values (NaN/inf ignored)."""
    steps = np.abs(np.diff(np.asarray(values)))
    steps = steps[np.isfinite(steps)]
    return float(np.median(steps)) if steps.size else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=50, help="time steps T")
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--num-grid", type=int, default=201, help="grid points for theta_1")
    parser.add_argument("--low", type=float, default=0.3)
    parser.add_argument("--high", type=float, default=0.7)
    parser.add_argument(
        "--resamplers",
        default=",".join(resamplers()),
        help="comma-separated subset of: " + ", ".join(resamplers()),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    available = resamplers()
    chosen = [name.strip() for name in args.resamplers.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(available))
    if unknown or not chosen:
        parser.error(f"unknown resampler(s) {unknown}; choose from {', '.join(available)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jax.config.update("jax_enable_x64", True)
    args.out.mkdir(parents=True, exist_ok=True)
    data_key, filter_key = jax.random.split(jax.random.PRNGKey(args.seed))
    _, observations = ndr.simulate(data_key, state_space_model(*TRUE_THETA), args.num_steps)
    grid = jnp.linspace(args.low, args.high, args.num_grid)
    theta_2 = TRUE_THETA[1]

    exact = np.asarray(
        jax.jit(
            jax.vmap(lambda a: ndr.kalman_log_likelihood(params(a, theta_2), observations[:, None]))
        )(grid)
    )
    curves, seconds = {}, {}
    for name in chosen:
        resampler = available[name]

        def log_likelihood(theta_1, resampler=resampler):
            return ndr.particle_filter(
                filter_key,
                state_space_model(theta_1, theta_2),
                observations,
                num_particles=args.num_particles,
                resampler=resampler,
            ).log_likelihood

        start = time.perf_counter()
        curves[name] = np.asarray(jax.jit(jax.vmap(log_likelihood))(grid))
        seconds[name] = time.perf_counter() - start

    exact_step = median_step(exact)
    steps = {name: median_step(curve) for name, curve in curves.items()}
    print(
        f"Fixed-key log-likelihood along theta_1 in [{args.low}, {args.high}] "
        f"({args.num_grid} points, T={args.num_steps}, N={args.num_particles}); "
        "median |neighbour difference|:"
    )
    print(f"  {'exact (Kalman)':<18} {exact_step:.3e}")
    for name, step in steps.items():
        print(f"  {name:<18} {step:.3e}  ({step / exact_step:7.1f} x exact)  {seconds[name]:.1f} s")

    grid_np = np.asarray(grid)
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.6))
    axes = axes.ravel()
    low = min(exact.min(), *(np.nanmin(c[np.isfinite(c)]) for c in curves.values()))
    high = max(exact.max(), *(np.nanmax(c[np.isfinite(c)]) for c in curves.values()))
    margin = 0.05 * (high - low)
    for ax, (name, curve) in zip(axes, curves.items(), strict=False):
        ax.plot(grid_np, exact, color="k", lw=1.2, label="exact (Kalman)")
        color = "tab:blue" if name == "diffusion" else "tab:red"
        ax.plot(grid_np, curve, color=color, lw=1.0, label=f"particle filter, {name}")
        ax.axvline(TRUE_THETA[0], color="0.6", ls=":", lw=1)
        ax.set_title(
            f"{name}\nmedian |step| {steps[name]:.2g} ({steps[name] / exact_step:.0f}x exact)",
            fontsize=10,
        )
        ax.set_ylim(low - margin, high + margin)
        ax.set_ylabel("log-likelihood")
        ax.set_xlabel("theta_1")
    axes[0].legend(fontsize=8, loc="lower center")

    for ax in axes[len(curves) : len(axes) - 1]:
        ax.set_visible(False)
    # Last panel: roughness of every curve on one log axis.
    ax = axes[-1]
    names = ["exact", *steps]
    values = [exact_step, *steps.values()]
    colors = ["k"] + ["tab:blue" if n == "diffusion" else "tab:red" for n in steps]
    ax.barh(names, values, color=colors)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("median |neighbour difference|")
    ax.set_title("roughness (log scale)", fontsize=10)
    fig.suptitle(
        f"Fixed-key particle-filter log-likelihood vs theta_1 (T={args.num_steps}, "
        f"N={args.num_particles}, {args.num_grid} grid points, dotted line: true value)"
    )
    fig.tight_layout()
    path = args.out / "why_diffusion.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Figure saved: {path}")
    return {"exact": exact_step, **steps, "figure": str(path)}


if __name__ == "__main__":
    main()
