"""Diffusion resampling: a smooth transport map from an ensemble score.

Andersson & Zhao, "Diffusion differentiable resampling", arXiv:2512.10401, ICML 2026.

The weighted cloud $(X_i, w_i)$ is whitened by its weighted mean $\\mu$ and covariance
$\\Sigma$ (diagonal, or full through a Cholesky factor), $Z_i = \\Sigma^{-1/2}(X_i - \\mu)$.
An Ornstein-Uhlenbeck process $dZ = -\\lambda Z\\,ds + \\sqrt{2\\lambda}\\,dW$ started from the
weighted empirical measure has the Gaussian transition
$Z_s \\mid Z_0 \\sim N(c_s Z_0, v_s I)$ with $c_s = e^{-\\lambda s}$, $v_s = 1 - e^{-2\\lambda s}$,
so its score is known in closed form for the ensemble (no training):

$$\\alpha_i(z, s) = \\mathrm{softmax}_i\\big(l_i + \\tfrac{c_s}{v_s} z^\\top Z_i
- \\tfrac{c_s^2}{2 v_s}|Z_i|^2\\big), \\qquad
\\nabla \\log p_s(z) = \\big(c_s \\textstyle\\sum_i \\alpha_i Z_i - z\\big)/v_s .$$

For all $N$ query points at once this is attention: an $(N\\times d)(d\\times N)$ product, a row
softmax and an $(N\\times N)(N\\times d)$ product. Output particles are produced by integrating
the reverse-time probability-flow ODE (or SDE) from $N(0, I)$ at $s = T_h$ down to
$s = \\Delta$, then un-whitening. Every step is differentiable in $(X, l)$ given the noise,
which is what makes a fixed-noise particle-filter likelihood smooth in the parameters.

The method is consistent as $N \\to \\infty$, not unbiased: for finite $N$ and horizon the output
is an approximation of the weighted cloud, exact in its first two moments only in the limit.
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import (
    check_bool,
    check_choice,
    check_non_negative,
    check_positive,
)
from numpyro_diffres.resampling.attention import attention, block_size
from numpyro_diffres.resampling.base import (
    MovesParticles,
    prepare,
    standard_draw,
    uniform_log_weights,
    whitening_scale,
)

__all__ = ["Diffusion", "NoiseDrivenDiffusion", "diffusion"]

_INTEGRATORS = ("exponential", "euler")
_COVARIANCES = ("auto", "diagonal", "full")


@dataclasses.dataclass(frozen=True)
class Diffusion(MovesParticles):
    """Diffusion resampling; see `diffusion` for the arguments."""

    num_steps: int
    time: float
    rate: float
    integrator: str
    ode: bool
    covariance: str
    jitter: float

    def _whiten(self, log_weights: Array, flat: Array):
        weights = jnp.exp(log_weights)
        mean = weights @ flat
        # Zero-weight rows take no part, whatever their value (a huge one would overflow when
        # squared, and 0 * inf is NaN); their keys get no attention anyway.
        centered = jnp.where((weights > 0)[:, None], flat - mean, jnp.zeros((), flat.dtype))
        # A relative floor keeps scale-free behaviour; the absolute floor sqrt(tiny) only
        # matters for a collapsed cloud, which then maps to its single point without NaN.
        scale = whitening_scale(weights, centered, self.jitter)
        if self.covariance == "diagonal" or (self.covariance == "auto" and flat.shape[1] == 1):
            return centered / scale, lambda z: mean + z * scale
        n, d = flat.shape
        standardized = centered / scale
        correlation = (standardized * weights[:, None]).T @ standardized
        correlation = 0.5 * (correlation + correlation.T)
        eye = jnp.eye(d, dtype=flat.dtype)
        # A cloud of effective size ESS spans at most ESS - 1 directions: with ESS near d or
        # below, its correlation matrix is (nearly) singular and the derivative of its inverse
        # factor explodes (measured: 4-D model, N = 64, ESS down to 1, scores of 1e9-1e11 where
        # the exact one is -28). Shrinking towards the diagonal reference by d / (ESS + d), as
        # d pseudo-observations of an identity correlation would, bounds its smallest
        # eigenvalue by that share (4/5 at ESS = 1, d = 4) and moves a well-populated cloud's
        # correlations by about d / ESS. The square of that share was measured too weak
        # (scores of 1e9 again on the same model).
        shrinkage = d / (1.0 / jnp.sum(weights**2) + d)
        correlation = (1.0 - shrinkage) * correlation + shrinkage * eye
        # Rank-deficient clouds (collinear particles, a collapsed coordinate, d >= N) have a
        # singular correlation matrix, which rounding can make indefinite: each entry is off by
        # about sqrt(N) eps (entries are at most 1), its eigenvalues by up to d times that. The
        # floor keeps the smallest eigenvalue above that error in float32 (1e-6 alone is not:
        # measured NaN at N = 64..512, d = 16..64); in float64 `jitter` is the larger one.
        floor = max(self.jitter, 4.0 * d * math.sqrt(n) * float(jnp.finfo(flat.dtype).eps))
        correlation = correlation + floor * eye
        # Should rounding still defeat the floor, whiten this cloud diagonally (identity factor)
        # rather than return NaN; the second `where` keeps the discarded branch's NaN out of
        # the gradient.
        factorizable = jax.lax.stop_gradient(
            jnp.all(jnp.isfinite(jnp.linalg.cholesky(correlation)))
        )
        cholesky = jnp.linalg.cholesky(jnp.where(factorizable, correlation, eye))
        # Invert the d x d factor once and multiply: solving against the (d, N) cloud directly
        # was measured twice as slow as diagonal whitening at N = 1024, d = 4.
        inverse = jax.scipy.linalg.solve_triangular(cholesky, eye, lower=True)
        whitened = standardized @ inverse.T
        return whitened, lambda z: mean + (z @ cholesky.T) * scale

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; returns `(particles, log_weights)` with uniform log-weights."""
        prepared = prepare(log_weights, particles)
        n, d = prepared.particles.shape
        dtype = prepared.particles.dtype
        init_key, noise_key = jax.random.split(key)
        start = standard_draw(jax.random.normal, init_key, (n, d), dtype)
        steps = (
            None
            if self.ode
            else standard_draw(jax.random.normal, noise_key, (self.num_steps, n, d), dtype)
        )
        return self._transport(prepared, start, steps)

    def noise_shape(self, num_particles: int, event_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the standard normals `from_noise` takes for `num_particles` particles.

        `(N, d)` for the ODE, the start $z$ of each output particle ($d$ the flattened event
        size); `(K + 1, N, d)` for the SDE: the start, then the noise of each of the $K$ steps.
        """
        start = (int(num_particles), math.prod(event_shape))
        return start if self.ode else (self.num_steps + 1, *start)

    def from_noise(self, noise: Array, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample with the given standard normals in place of a key's draws.

        The same map as calling with a key: a key draws exactly these normals (the start, and
        for the SDE the step noises), so the output is a smooth function of `noise` as well as
        of the particles and weights, which is what pseudo-marginal HMC needs.

        Args:
            noise: standard normals of shape `noise_shape(N, event_shape)`.
            log_weights: `(N,)`, unnormalised.
            particles: `(N, *event_shape)`.

        Returns:
            `(particles, log_weights)` with uniform log-weights.

        Raises:
            ValueError: `noise` of another shape.
        """
        prepared = prepare(log_weights, particles)
        expected = self.noise_shape(prepared.particles.shape[0], prepared.event_shape)
        noise = jnp.asarray(noise)
        if noise.shape != expected:
            kind = "(N, d)" if self.ode else "(num_steps + 1, N, d) for the SDE"
            raise ValueError(
                f"diffusion resampling of {prepared.particles.shape[0]} particles of shape "
                f"{prepared.event_shape} takes standard normals of shape {kind} = {expected}; "
                f"got {noise.shape}."
            )
        noise = noise.astype(prepared.particles.dtype)
        start, steps = (noise, None) if self.ode else (noise[0], noise[1:])
        return self._transport(prepared, start, steps)

    def driven_by_noise(self) -> "NoiseDrivenDiffusion":
        """This resampler taking standard normals in place of a key (`from_noise`)."""
        return NoiseDrivenDiffusion(self)

    def _transport(self, prepared, start: Array, steps: Array | None) -> tuple[Array, Array]:
        """Integrate from the start `z` `(N, d)` (with SDE step noises `(K, N, d)`)."""
        flat, normalized, event_shape = prepared
        n = flat.shape[0]
        dtype = flat.dtype
        data, unwhiten = self._whiten(normalized, flat)
        half_squared_norms = 0.5 * jnp.sum(data**2, axis=1)

        delta = self.time / self.num_steps
        times = self.time - delta * np.arange(self.num_steps)
        decay = np.exp(-self.rate * times)
        variances = -np.expm1(-2.0 * self.rate * times)
        coefficients = np.stack([decay / variances, decay**2 / variances, 1.0 / variances], 1)
        score_weight = 1.0 if self.ode else 2.0
        if self.integrator == "exponential":
            growth = math.exp(self.rate * delta)
            drift, noise_scale = growth - 1.0, math.sqrt(math.expm1(2.0 * self.rate * delta))
        else:
            growth = 1.0 + self.rate * delta
            drift, noise_scale = self.rate * delta, math.sqrt(2.0 * self.rate * delta)

        # The attention's own reverse pass recomputes each softmax (block by block over the
        # queries, memory O(B N)) instead of storing K N x N matrices: memory no longer grows
        # with K, and it was never slower than storing them where both were measured.
        block = block_size(n, n)

        def step(z, inputs):
            coefficient, step_noise = inputs
            c_over_v, c2_over_v, inv_v = coefficient[0], coefficient[1], coefficient[2]
            # Logits l_j + (c/v) z.Z_j - (c^2/2v)|Z_j|^2: a bias per key plus a scaled product.
            bias = normalized - c2_over_v * half_squared_norms
            posterior_mean = attention(z, data, bias, c_over_v, block=block)
            # score = (c * E[Z | z] - z) / v
            score = c_over_v * posterior_mean - inv_v * z
            z = growth * z + drift * score_weight * score
            if step_noise is not None:
                z = z + noise_scale * step_noise
            return z, None

        z, _ = jax.lax.scan(step, start, (jnp.asarray(coefficients, dtype), steps))
        return unwhiten(z).reshape(n, *event_shape), uniform_log_weights(n, dtype)


@dataclasses.dataclass(frozen=True)
class NoiseDrivenDiffusion(MovesParticles):
    """Diffusion resampling called with standard normals in place of a key.

    What `Diffusion.driven_by_noise` returns, for the filter on explicit noise
    (`noise.noise_filter`, `particle_factor(..., noise="sampled")`): called as
    `(noise, log_weights, particles)` with `noise` of shape `noise_shape(N, event_shape)`.

    Attributes:
        diffusion: the key-driven resampler whose map it runs.
    """

    diffusion: Diffusion
    takes_noise: ClassVar[bool] = True

    def noise_shape(self, num_particles: int, event_shape: tuple[int, ...]) -> tuple[int, ...]:
        """See `Diffusion.noise_shape`."""
        return self.diffusion.noise_shape(num_particles, event_shape)

    def __call__(self, noise: Array, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; see `Diffusion.from_noise`."""
        return self.diffusion.from_noise(noise, log_weights, particles)


def diffusion(
    *,
    num_steps: int = 8,
    time: float = 1.0,
    rate: float = 1.0,
    integrator: str = "exponential",
    ode: bool = True,
    covariance: str = "auto",
    jitter: float = 1e-6,
) -> Diffusion:
    """Diffusion resampling (the package default).

    Args:
        num_steps: reverse-integration steps $K$ (paper: 4-32; keep it small, backpropagating
            through many SDE steps can blow up).
        time: horizon $T_h$ of the forward process (paper: 1-3).
        rate: OU rate $\\lambda$ (the paper's $a = -\\lambda$; default 1).
        integrator: `"exponential"` (Jentzen-Kloeden, best in the paper) or `"euler"`.
        ode: integrate the probability-flow ODE (True, smoother gradients) or the reverse SDE.
        covariance: `"full"` whitening by a Cholesky factor of the weighted covariance,
            `"diagonal"` whitening by per-coordinate standard deviations, or `"auto"` (default):
            full for states with more than one coordinate, diagonal (the same map, cheaper)
            for one. The reverse integration starts from $N(0, I)$; after diagonal whitening
            the cloud at the horizon still carries a share $e^{-2\\lambda T_h}$ of its
            correlations, which the output then loses whatever $N$ (a biased gradient for
            correlated states: see `benchmarks/results/gradients.md`). Full whitening makes
            the cloud's covariance exactly $I$.
        jitter: relative variance floor added when whitening.

    Returns:
        A resampler `(key, log_weights, particles) -> (particles, log_weights)`.

    Raises:
        ValueError: non-positive `num_steps`, `time`, `rate` or negative `jitter`, or an unknown
            `integrator` / `covariance`.
        TypeError: a non-numeric (or bool) `num_steps`, `time`, `rate` or `jitter`, a
            non-integer `num_steps`, or a non-bool `ode`.
    """
    check_positive("num_steps", num_steps, integer=True)
    check_positive("time", time)
    check_positive("rate", rate)
    jitter = check_non_negative("jitter", jitter)
    ode = check_bool("ode", ode)
    check_choice("integrator", integrator, _INTEGRATORS)
    check_choice("covariance", covariance, _COVARIANCES)
    return Diffusion(int(num_steps), float(time), float(rate), integrator, ode, covariance, jitter)
