"""blackjax NUTS and NumPyro NUTS on the same particle-filter model.

The linear-Gaussian model of the paper's App. I,

    x_0 ~ N(0, 1),  x_t = theta_1 x_{t-1} + N(0, 1),  y_t = theta_2 x_t + N(0, 0.5),

simulated at theta = (0.5, 1.0), with the diffusion particle-filter likelihood
(`ndr.particle_factor`). One NumPyro model is sampled twice: by `numpyro.infer.MCMC(NUTS)` and by
blackjax NUTS with window adaptation (`numpyro_diffres.samplers.blackjax_nuts`, which builds the
potential with `numpyro.infer.util.initialize_model`). The filter key is passed explicitly, so
both samplers target exactly the same fixed-noise surrogate posterior and differ only by Monte
Carlo error. NUTS on the exact Kalman likelihood is shown as the reference.

    python examples/blackjax_nuts.py [--num-steps 60] [--num-particles 64] [--num-samples 300]
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
from numpyro_diffres.samplers import blackjax_nuts, to_inference_data

TRUE = {"theta_1": 0.5, "theta_2": 1.0}
EMISSION_VARIANCE = 0.5


def params(theta_1, theta_2):
    """The model's matrices as `LinearGaussianParams` (state and observation `(1,)`)."""
    eye = jnp.eye(1)
    return ndr.LinearGaussianParams(
        jnp.zeros(1), eye, theta_1 * eye, eye, theta_2 * eye, EMISSION_VARIANCE * eye
    )


def priors():
    """theta_1 ~ U(-0.99, 0.99), theta_2 ~ LogNormal(0, 0.5) (positive: its sign is free)."""
    theta_1 = numpyro.sample("theta_1", dist.Uniform(-0.99, 0.99))
    theta_2 = numpyro.sample("theta_2", dist.LogNormal(0.0, 0.5))
    return theta_1, theta_2


def particle_model(observations, filter_key, num_particles=64):
    """NumPyro model with the diffusion particle-filter likelihood under a given filter key."""
    theta_1, theta_2 = priors()
    ndr.particle_factor(
        "y",
        ndr.linear_gaussian(params(theta_1, theta_2)),
        observations,
        num_particles=num_particles,
        key=filter_key,
    )


def exact_model(observations):
    """The same model with the exact Kalman likelihood (the reference)."""
    theta_1, theta_2 = priors()
    numpyro.factor("y", ndr.kalman_log_likelihood(params(theta_1, theta_2), observations))


def numpyro_nuts(model, key, args, *model_args, **model_kwargs):
    """NumPyro NUTS; returns the draws `(draws,)` per site, divergences and wall time."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        progress_bar=not args.no_progress,
    )
    start = time.perf_counter()
    mcmc.run(key, *model_args, extra_fields=("diverging",), **model_kwargs)
    samples = jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - start
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    return {k: np.asarray(v) for k, v in samples.items()}, divergences, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=60, help="time steps T")
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--num-warmup", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jax.config.update("jax_enable_x64", True)
    args.out.mkdir(parents=True, exist_ok=True)
    data_key, filter_key, numpyro_key, blackjax_key, exact_key = jax.random.split(
        jax.random.PRNGKey(args.seed), 5
    )
    _, observations = ndr.simulate(
        data_key, ndr.linear_gaussian(params(*TRUE.values())), args.num_steps
    )
    settings = {"num_particles": args.num_particles}

    print(
        f"NumPyro NUTS on the diffusion PF likelihood (T={args.num_steps}, N={args.num_particles}):"
    )
    numpyro_samples, numpyro_divergences, numpyro_seconds = numpyro_nuts(
        particle_model, numpyro_key, args, observations, filter_key, **settings
    )
    print("blackjax NUTS (window adaptation) on the same model:")
    start = time.perf_counter()
    result = blackjax_nuts(
        blackjax_key,
        particle_model,
        observations,
        filter_key,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        **settings,
    )
    jax.block_until_ready(result.samples)
    blackjax_seconds = time.perf_counter() - start
    blackjax_samples = {k: np.asarray(v).reshape(-1) for k, v in result.samples.items()}
    blackjax_divergences = int(np.asarray(result.info.diverging).sum())
    blackjax_ess = az.ess(to_inference_data(result), var_names=list(TRUE))
    print("NumPyro NUTS on the exact Kalman likelihood (reference):")
    exact_samples, _, _ = numpyro_nuts(exact_model, exact_key, args, observations)

    results = {
        "numpyro_seconds": numpyro_seconds,
        "blackjax_seconds": blackjax_seconds,
        "numpyro_divergences": numpyro_divergences,
        "blackjax_divergences": blackjax_divergences,
    }
    header = f"{'':<8} {'true':>6} {'exact':>13} {'NumPyro NUTS':>13} {'blackjax NUTS':>13}"
    print(f"\nposterior mean (sd)\n{header}")
    for name, value in TRUE.items():
        cells = []
        for label, samples in (
            ("exact", exact_samples),
            ("numpyro", numpyro_samples),
            ("blackjax", blackjax_samples),
        ):
            results[f"{name}_{label}_mean"] = float(samples[name].mean())
            results[f"{name}_{label}_sd"] = float(samples[name].std())
            cells.append(f"{samples[name].mean():6.3f} ({samples[name].std():.3f})")
        results[f"{name}_blackjax_ess"] = float(blackjax_ess[name])
        print(f"{name:<8} {value:6.3f} " + " ".join(f"{c:>13}" for c in cells))
    print(
        f"NumPyro NUTS {numpyro_seconds:.1f} s ({numpyro_divergences} divergences); blackjax "
        f"NUTS {blackjax_seconds:.1f} s ({blackjax_divergences} divergences, ESS "
        + ", ".join(f"{name} {float(blackjax_ess[name]):.0f}" for name in TRUE)
        + ")"
    )

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, name in zip(axes, TRUE, strict=True):
        everything = np.concatenate(
            [exact_samples[name], numpyro_samples[name], blackjax_samples[name]]
        )
        bins = np.linspace(everything.min(), everything.max(), 35)
        ax.hist(
            exact_samples[name],
            bins=bins,
            density=True,
            alpha=0.3,
            color="0.4",
            label="exact likelihood (Kalman), NumPyro NUTS",
        )
        ax.hist(
            numpyro_samples[name],
            bins=bins,
            density=True,
            histtype="step",
            lw=2,
            label="diffusion PF, NumPyro NUTS",
        )
        ax.hist(
            blackjax_samples[name],
            bins=bins,
            density=True,
            histtype="step",
            lw=2,
            ls="--",
            label="diffusion PF, blackjax NUTS",
        )
        ax.axvline(TRUE[name], color="k", ls=":", label="true value")
        ax.set_xlabel(name)
        ax.set_ylabel("posterior density")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Same model and filter key (T={args.num_steps}, N={args.num_particles}): blackjax "
        "NUTS vs NumPyro NUTS"
    )
    fig.tight_layout()
    path = args.out / "blackjax_nuts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Figure saved: {path}")
    results["figure"] = str(path)
    return results


if __name__ == "__main__":
    main()
