"""NUTS on a particle-filter likelihood against NUTS on the exact Kalman likelihood.

The linear-Gaussian model of the paper's App. I,

    x_0 ~ N(0, 1),  x_t = theta_1 x_{t-1} + N(0, 1),  y_t = theta_2 x_t + N(0, 0.5),

simulated at theta = (0.5, 1.0). The same NumPyro model is fitted twice: once with
`ndr.particle_factor` (diffusion resampling, a fixed-noise surrogate of the likelihood under
NUTS) and once with `numpyro.factor("y", ndr.kalman_log_likelihood(...))`, the exact answer.
theta_2 and -theta_2 give the same likelihood (flip the sign of x), so its prior is positive.
The script prints both posteriors' means and standard deviations next to the true values and
saves one figure with the marginal posteriors overlaid and the joint posterior.

    python examples/linear_gaussian.py [--num-steps 100] [--num-particles 64] [--num-samples 400]
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

import numpyro_diffres as ndr

TRUE = {"theta_1": 0.5, "theta_2": 1.0}
EMISSION_VARIANCE = 0.5


def params(theta_1, theta_2):
    """The model's matrices as `LinearGaussianParams` (state and observation `(1,)`)."""
    eye = jnp.eye(1)
    return ndr.LinearGaussianParams(
        jnp.zeros(1), eye, theta_1 * eye, eye, theta_2 * eye, EMISSION_VARIANCE * eye
    )


def priors():
    """theta_1 ~ U(-0.99, 0.99) (stationary), theta_2 ~ LogNormal(0, 0.5) (sign fixed)."""
    theta_1 = numpyro.sample("theta_1", dist.Uniform(-0.99, 0.99))
    theta_2 = numpyro.sample("theta_2", dist.LogNormal(0.0, 0.5))
    return theta_1, theta_2


def particle_model(observations, num_particles=64):
    """NumPyro model whose likelihood is the diffusion particle filter."""
    theta_1, theta_2 = priors()
    ndr.particle_factor(
        "y",
        ndr.linear_gaussian(params(theta_1, theta_2)),
        observations,
        num_particles=num_particles,
    )


def exact_model(observations):
    """The same model with the exact Kalman likelihood (the reference)."""
    theta_1, theta_2 = priors()
    numpyro.factor("y", ndr.kalman_log_likelihood(params(theta_1, theta_2), observations))


def run_nuts(model, key, observations, args, **kwargs):
    """NUTS with the script's settings; returns the samples, divergences and wall time."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        chain_method="sequential",
        progress_bar=not args.no_progress,
    )
    start = time.perf_counter()
    mcmc.run(key, observations, extra_fields=("diverging",), **kwargs)
    samples = jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - start
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    return {k: np.asarray(v) for k, v in samples.items()}, divergences, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=100, help="time steps T")
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--num-chains", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jax.config.update("jax_enable_x64", True)
    args.out.mkdir(parents=True, exist_ok=True)
    data_key, particle_key, exact_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    _, observations = ndr.simulate(
        data_key, ndr.linear_gaussian(params(*TRUE.values())), args.num_steps
    )

    print(
        f"NUTS on the diffusion particle-filter likelihood (T={args.num_steps}, "
        f"N={args.num_particles}):"
    )
    particle, particle_divergences, particle_seconds = run_nuts(
        particle_model, particle_key, observations, args, num_particles=args.num_particles
    )
    print("NUTS on the exact Kalman likelihood:")
    exact, _, exact_seconds = run_nuts(exact_model, exact_key, observations, args)

    results = {
        "particle_seconds": particle_seconds,
        "exact_seconds": exact_seconds,
        "divergences": particle_divergences,
    }
    print(f"\n{'':<8} {'true':>6} {'PF mean':>8} {'PF sd':>7} {'exact mean':>10} {'exact sd':>8}")
    for name, value in TRUE.items():
        results[f"{name}_mean"] = float(particle[name].mean())
        results[f"{name}_sd"] = float(particle[name].std())
        results[f"{name}_exact_mean"] = float(exact[name].mean())
        results[f"{name}_exact_sd"] = float(exact[name].std())
        print(
            f"{name:<8} {value:6.3f} {results[f'{name}_mean']:8.3f} {results[f'{name}_sd']:7.3f}"
            f" {results[f'{name}_exact_mean']:10.3f} {results[f'{name}_exact_sd']:8.3f}"
        )
    print(
        f"particle-filter NUTS {particle_seconds:.1f} s ({particle_divergences} divergences), "
        f"exact NUTS {exact_seconds:.1f} s"
    )

    particle_label = f"diffusion PF, N={args.num_particles}"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes[:2], TRUE, strict=True):
        both = np.concatenate([particle[name], exact[name]])
        bins = np.linspace(both.min(), both.max(), 35)
        ax.hist(exact[name], bins=bins, density=True, alpha=0.45, label="exact (Kalman)")
        ax.hist(
            particle[name], bins=bins, density=True, histtype="step", lw=2, label=particle_label
        )
        ax.axvline(TRUE[name], color="k", ls="--", label="true value")
        ax.set_xlabel(name)
        ax.set_ylabel("posterior density")
    axes[0].legend(fontsize=8)
    ax = axes[2]
    ax.scatter(exact["theta_1"], exact["theta_2"], s=5, alpha=0.35, label="exact (Kalman)")
    ax.scatter(particle["theta_1"], particle["theta_2"], s=5, alpha=0.35, label=particle_label)
    ax.plot(TRUE["theta_1"], TRUE["theta_2"], "k*", ms=10, label="true value")
    ax.set_xlabel("theta_1")
    ax.set_ylabel("theta_2")
    ax.set_title("joint posterior", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"Linear-Gaussian SSM, T={args.num_steps}: NUTS on the diffusion particle-filter "
        "likelihood vs NUTS on the exact Kalman likelihood"
    )
    fig.tight_layout()
    path = args.out / "linear_gaussian.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Figure saved: {path}")
    results["figure"] = str(path)
    return results


if __name__ == "__main__":
    main()
