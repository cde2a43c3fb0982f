"""PMMH of the NumPy library `particles` (0.4): `which_method`'s outside reference.

`particles` declares numpy < 2; install it without letting pip downgrade numpy (which breaks
jax): `pip install --no-deps particles==0.4 numba llvmlite joblib`. Its filter runs under
numpy 2; only `PMMH.compute_post` needs the one-line fix in `run_particles`.
"""

import math
import time

import numpy as np


def run_particles(case):
    """PMMH of `particles` 0.4: one chain, its adaptive random walk, the same iterations.

    Returns:
        `(draws, warm-up seconds, sampling seconds)`: draws `{static: (1, samples)}`, the
        seconds the run's share of warm-up and sampling iterations.
    """
    from particles import distributions as dists  # noqa: PLC0415
    from particles import mcmc, state_space_models  # noqa: PLC0415

    class Growth(state_space_models.StateSpaceModel):
        default_params = {"sv": 3.0}

        def PX0(self):  # noqa: N802 (particles' names)
            return dists.Normal(loc=0.0, scale=math.sqrt(5.0))

        def PX(self, t, xp):  # noqa: N802
            mean = xp / 2.0 + 25.0 * xp / (1.0 + xp**2) + 8.0 * np.cos(1.2 * t)
            return dists.Normal(loc=mean, scale=self.sv)

        def PY(self, t, xp, x):  # noqa: N802
            return dists.Normal(loc=x**2 / 20.0, scale=1.0)

    class PMMH(mcmc.PMMH):
        # numpy 2 refuses to store the prior's one-element log-density array into a scalar.
        def compute_post(self):
            self.prop.lpost[0] = np.squeeze(self.prior.logpdf(self.prop.theta))
            if np.isfinite(self.prop.lpost[0]):
                filter_ = self.alg_instance(
                    {name: self.prop.theta[name][0] for name in self.prop.theta.dtype.names}
                )
                filter_.run()
                self.prop.lpost[0] += filter_.logLt

    if case["particles_model"] == "growth":
        ssm = Growth
        prior = dists.StructDist({"sv": dists.TruncNormal(mu=0.0, sigma=5.0, a=0.0, b=np.inf)})
    else:
        ssm = state_space_models.StochVol
        prior = dists.StructDist(
            {
                "mu": dists.Normal(loc=0.0, scale=2.0),
                "rho": dists.LinearD(dists.Beta(a=10.0, b=1.5), a=2.0, b=-1.0),
                "sigma": dists.TruncNormal(mu=0.0, sigma=1.0, a=0.0, b=np.inf),
            }
        )
    data = list(np.asarray(case["data"], np.float64))
    iterations = case["warmup"] + case["samples"]
    sampler = PMMH(
        ssm_cls=ssm,
        prior=prior,
        data=data,
        Nx=case["num_particles"]["particles"],
        niter=iterations,
        adaptive=True,
    )
    np.random.seed(0)
    start = time.perf_counter()
    sampler.run()
    seconds = time.perf_counter() - start
    names = {"rho": "phi"}
    draws = {
        names.get(k, k): np.asarray(sampler.chain.theta[k][case["warmup"] :])[None]
        for k in sampler.chain.theta.dtype.names
    }
    share = case["warmup"] / iterations
    return draws, seconds * share, seconds * (1 - share)
