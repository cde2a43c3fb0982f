"""Entropy-regularised optimal-transport resampling.

Corenflos, Thornton, Deligiannidis & Doucet, "Differentiable particle filtering via
entropy-regularized optimal transport", 2021.

The weighted cloud $(X, w)$ is transported onto the uniform cloud $(X, 1/N)$ by the Sinkhorn
plan $P$ (row sums $w$, column sums $1/N$); output particle $j$ is $N \\sum_i P_{ij} X_i$.
The particles are whitened by their weighted per-coordinate standard deviation first, so
`epsilon` is relative to a unit-variance cloud. Solved with ott-jax; gradients by implicit
differentiation of the Sinkhorn fixed point (the default) or by unrolling the iterations.
The method is biased for every $\\epsilon > 0$ (it contracts the cloud) and costs
$O(N^2 d)$ per Sinkhorn iteration.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import lineax

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import check_bool, check_positive
from numpyro_diffres.resampling.base import (
    MovesParticles,
    prepare,
    uniform_log_weights,
    whitening_scale,
)

__all__ = ["OptimalTransport", "TransportInfo", "optimal_transport"]


class TransportInfo(NamedTuple):
    """Sinkhorn diagnostics.

    Attributes:
        converged: whether the marginal error fell below `threshold` within `max_iterations`.
        num_iterations: Sinkhorn iterations used.
        error: the final marginal error.
    """

    converged: Array
    num_iterations: Array
    error: Array


def _all_finite(tree) -> Array:
    """Whether every entry of every array in `tree` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


class _FiniteOrZero(lineax.AbstractLinearSolver):
    """Normal-equations CG for the implicit gradient that never raises.

    With strongly degenerate weights (an effective sample size near 1, common under
    informative observations) the implicit-differentiation system is so ill-conditioned in
    float32 that CG returns a non-finite solution or stops at its step limit, and
    `lineax.linear_solve` then raises inside `jit` (through a host callback), aborting e.g. a
    whole NUTS run. Here a non-finite solution is replaced by zero, which drops the implicit
    term of the gradient for that call (the explicit term remains), and the step limit is
    not an error either: the implicit term is dropped then too. This prevents the crash, not
    the underlying inaccuracy: for such clouds the float32 implicit gradient can be far from
    the unrolled one (or NaN after many filter steps); `implicit_gradient=False` is the
    reliable choice there.
    """

    inner: lineax.AbstractLinearSolver

    def __init__(self, **kwargs):
        self.inner = lineax.Normal(lineax.CG(**kwargs))

    def init(self, operator, options):
        return self.inner.init(operator, options)

    def compute(self, state, vector, options):
        solution, result, statistics = self.inner.compute(state, vector, options)
        finite = _all_finite(solution)
        usable = finite & (result == lineax.RESULTS.successful)
        solution = jax.tree.map(lambda x: jnp.where(usable, x, jnp.zeros_like(x)), solution)
        return solution, lineax.RESULTS.successful, statistics

    def transpose(self, state, options):
        return self.inner.transpose(state, options)

    def conj(self, state, options):
        return self.inner.conj(state, options)

    def assume_full_rank(self):
        return self.inner.assume_full_rank()


@jax.custom_vjp
def _finite_gradient_or_none(log_weights: Array, particles: Array) -> tuple[Array, Array]:
    """Identity whose reverse pass drops the whole cotangent if any entry is not finite.

    Even with `_FiniteOrZero`, the implicit gradient of a nearly degenerate float32 cloud can
    overflow in the products around the linear solve. Its partial entries would then be
    NaN or meaningless, so the resampling step contributes no gradient at all (as if its
    output were a constant), which keeps the filter's gradient finite and defined.
    """
    return log_weights, particles


def _finite_gradient_or_none_forward(log_weights, particles):
    return (log_weights, particles), None


def _finite_gradient_or_none_backward(_, cotangents):
    finite = _all_finite(cotangents)
    return tuple(jnp.where(finite, c, jnp.zeros_like(c)) for c in cotangents)


_finite_gradient_or_none.defvjp(_finite_gradient_or_none_forward, _finite_gradient_or_none_backward)


@dataclasses.dataclass(frozen=True)
class OptimalTransport(MovesParticles):
    """Entropy-regularised OT resampling; see `optimal_transport`."""

    epsilon: float
    threshold: float
    max_iterations: int
    implicit_gradient: bool

    def solve(
        self, key: PRNGKey, log_weights: Array, particles: Array
    ) -> tuple[Array, Array, TransportInfo]:
        """Resample and report convergence: `(particles, log_weights, TransportInfo)`."""
        del key  # deterministic given the input
        # Imported here: ott-jax takes about a second to import (it pulls in scipy.stats),
        # which every user of the package paid whether or not they used this resampler.
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import implicit_differentiation, sinkhorn

        if self.implicit_gradient:
            log_weights, particles = _finite_gradient_or_none(log_weights, particles)
        flat, normalized, event_shape = prepare(log_weights, particles)
        n = flat.shape[0]
        weights = jnp.exp(normalized)
        mean = weights @ flat
        # Every input particle is also a target location. One whose weight is below the
        # source floor (dead, or underflowed) and far from the cloud is a target no mass can
        # reach: Sinkhorn stalls, the output keeps the dead particle and the implicit
        # gradient's linear solve fails (lineax raises). It is moved to the weighted mean.
        floor = jnp.finfo(flat.dtype).eps ** 2
        negligible = normalized < jnp.log(floor)
        flat = jnp.where(negligible[:, None], mean, flat)
        centered = flat - mean  # zero on the rows of zero weight, as whitening_scale needs
        whitened = centered / whitening_scale(weights, centered, 1e-6)
        geometry = pointcloud.PointCloud(whitened, whitened, epsilon=self.epsilon)
        # A zero source weight (a dropped or underflowed particle) turns the implicit
        # gradient into 0 * inf = NaN; a floor far below the dtype's resolution avoids it
        # without changing the forward pass.
        source = jnp.maximum(weights, floor)
        problem = linear_problem.LinearProblem(
            geometry, a=source / jnp.sum(source), b=jnp.full((n,), 1.0 / n, flat.dtype)
        )
        # The implicit system is singular along the constant shift of the potentials
        # (ridge_kernel removes it; valid for balanced OT) and ott's default tolerance of 1e-6
        # is below float32 resolution: without both, lineax raises on small or well separated
        # float32 clouds.
        tolerance = max(1e-6, 1e3 * float(jnp.finfo(flat.dtype).eps))
        solver = sinkhorn.Sinkhorn(
            threshold=self.threshold,
            max_iterations=self.max_iterations,
            implicit_diff=implicit_differentiation.ImplicitDiff(
                solver_kwargs={
                    "ridge_kernel": 1e-2,
                    "nonsym_solver": _FiniteOrZero,
                    "rtol": tolerance,
                    "atol": tolerance,
                }
            )
            if self.implicit_gradient
            else None,
        )
        output = solver(problem)
        plan = output.matrix
        # Columns of the plan sum to 1/N; normalise exactly so the output is a convex
        # combination even when Sinkhorn stopped early.
        columns = plan / jnp.sum(plan, axis=0, keepdims=True)
        resampled = columns.T @ flat
        error = output.errors[jnp.maximum(output.n_iters // output.inner_iterations - 1, 0)]
        info = TransportInfo(output.converged, output.n_iters, error)
        return resampled.reshape(n, *event_shape), uniform_log_weights(n, flat.dtype), info

    def __call__(self, key: PRNGKey, log_weights: Array, particles: Array) -> tuple[Array, Array]:
        """Resample; use `solve` to also get the convergence diagnostics."""
        resampled, new_log_weights, _ = self.solve(key, log_weights, particles)
        return resampled, new_log_weights


def optimal_transport(
    epsilon: float = 0.5,
    *,
    threshold: float = 1e-3,
    max_iterations: int = 2000,
    implicit_gradient: bool = True,
) -> OptimalTransport:
    """Entropy-regularised optimal-transport resampling.

    Non-convergence is never hidden: `resampler.solve(...)` returns a `TransportInfo` with the
    Sinkhorn `converged` flag, iteration count and final marginal error. When Sinkhorn stops
    early the plan's columns are renormalised, so the output stays a convex combination of the
    input particles, but it no longer carries the target weights exactly.

    Args:
        epsilon: entropic regularisation, relative to the whitened (unit-variance) cloud.
            Smaller is less biased but needs more iterations.
        threshold: Sinkhorn marginal-error tolerance.
        max_iterations: Sinkhorn iteration cap.
        implicit_gradient: differentiate the fixed point implicitly (memory $O(N^2)$,
            independent of the iteration count) rather than by unrolling the iterations.
            Where the implicit gradient of one call is not finite (nearly degenerate weights
            in float32), that call contributes no gradient; the unrolled gradient
            (`implicit_gradient=False`) has no such failure.

    Raises:
        ValueError: non-positive `epsilon`, `threshold` or `max_iterations`.
        TypeError: a non-numeric (or bool) `epsilon` or `threshold`, a non-integer
            `max_iterations`, or a non-bool `implicit_gradient`.
    """
    check_positive("epsilon", epsilon)
    check_positive("threshold", threshold)
    check_positive("max_iterations", max_iterations, integer=True)
    implicit_gradient = check_bool("implicit_gradient", implicit_gradient)
    return OptimalTransport(
        float(epsilon), float(threshold), int(max_iterations), implicit_gradient
    )
