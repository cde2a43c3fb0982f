"""Is the fixed-key log-likelihood smooth enough for NUTS? A check to run before sampling.

Under NUTS the particle filter runs with one fixed key, so NUTS integrates Hamiltonian dynamics on
the surface $\\theta \\mapsto \\log \\hat p_N(y \\mid \\theta; u)$ with its pathwise gradient.
A smooth resampler makes that surface continuous, not necessarily *smooth at the scale NUTS
moves on*: where the transition is expansive ($|f'(x)| > 1$, e.g. the nonlinear growth model)
the pathwise derivative of each particle is multiplied by $f'$ at every step, and the fixed-key
gradient can be hundreds of times larger than the slope of the likelihood itself, changing sign
between neighbouring points. NUTS's step size then collapses.

`surface` (any `log_likelihood_fn(key, params)`) and `filter_surface` (a
`model_fn(params) -> StateSpaceModel` and `particle_filter`) evaluate, along a short segment
through the given parameters in each direction (one per scalar parameter by default):

* the fixed-key log-likelihood and its directional derivative at `num_points` points;
* the *averaged slope*: a least-squares line through each of `num_keys` other keys' values,
  averaged over keys (the slope of the expected log-likelihood, with its key-to-key spread);

and report three numbers per direction, with a verdict:

* `gradient_ratio`: median over the points of $|g - \\bar s| / (|\\bar s| + \\text{spread})$,
  where $g$ is the fixed-key gradient and $\\bar s$ the averaged slope. About 1 or less for a
  smooth surface (the fixed-key gradient differs from the slope by key noise); large when
  derivatives explode along particle histories. Rough above `3`.
* `sign_change_fraction`: the share of neighbouring points between which the fixed-key gradient
  changes sign. A smooth function on a short segment changes sign at most once or twice. Rough
  above `0.25`.
* `mismatch`: the largest difference, in log-likelihood units, between the change of the value
  from one point to the next and the change its gradient predicts (trapezoid rule). NUTS
  rejects when such errors add up to more than about one unit along a trajectory. Rough above
  `1.0`. The largest value change between neighbours is reported as `largest_jump`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.typing import DTypeLike

from numpyro_diffres._typing import Array, PRNGKey
from numpyro_diffres._validation import (
    check_callable,
    check_count,
    check_positive,
)
from numpyro_diffres.particle_counts import (
    ParticleCount,
    _filter_log_likelihood,
    choose_marginal_num_particles,
    choose_num_particles,
    choose_pmmh_num_particles,
)
from numpyro_diffres.resampling import Resampler
from numpyro_diffres.ssm import StateSpaceModel

__all__ = [
    "ParticleCount",
    "SurfaceReport",
    "choose_marginal_num_particles",
    "choose_num_particles",
    "choose_pmmh_num_particles",
    "filter_surface",
    "surface",
]

GRADIENT_RATIO_LIMIT = 3.0
SIGN_CHANGE_LIMIT = 0.25
MISMATCH_LIMIT = 1.0


class SurfaceReport(NamedTuple):
    """What `surface` and `filter_surface` return; `str(report)` is a readable summary.

    Arrays have one row per direction `D` and one column per point `P`.

    Attributes:
        verdict: `"smooth"` or `"rough"` (rough when any direction fails any check, or when a
            value or gradient is not finite).
        names: a name per direction, e.g. `"sv"` or `"theta[1]"`.
        offsets: `(D, P)`, the distance $s$ along each direction: the points are
            $\\theta + s\\,u$.
        log_likelihood: `(D, P)`, the fixed-key log-likelihood at the points.
        gradient: `(D, P)`, the fixed-key directional derivative $d/ds$ at the points.
        averaged_slope: `(D,)`, the slope of the log-likelihood averaged over `num_keys` keys.
        slope_error: `(D,)`, its standard error.
        slope_spread: `(D,)`, the standard deviation of the per-key slopes.
        gradient_ratio: `(D,)`, see the module docstring.
        sign_change_fraction: `(D,)`, see the module docstring.
        mismatch: `(D,)`, see the module docstring.
        largest_jump: `(D,)`, the largest change of the fixed-key value between neighbours.
        rough: `(D,)` bool, which directions failed.
        advice: what to do, in words.
    """

    verdict: str
    names: tuple[str, ...]
    offsets: np.ndarray
    log_likelihood: np.ndarray
    gradient: np.ndarray
    averaged_slope: np.ndarray
    slope_error: np.ndarray
    slope_spread: np.ndarray
    gradient_ratio: np.ndarray
    sign_change_fraction: np.ndarray
    mismatch: np.ndarray
    largest_jump: np.ndarray
    rough: np.ndarray
    advice: str

    def summary(self) -> str:
        """A table of the numbers per direction, the verdict and the advice."""
        lines = [
            f"Fixed-key log-likelihood surface: {self.verdict.upper()}",
            f"{'direction':>12} {'averaged slope':>18} {'median |grad|':>14} "
            f"{'grad ratio':>10} {'sign changes':>12} {'mismatch':>9} {'verdict':>7}",
        ]
        for i, name in enumerate(self.names):
            slope = f"{self.averaged_slope[i]:.3g} ± {self.slope_error[i]:.2g}"
            lines.append(
                f"{name:>12} {slope:>18} {np.median(np.abs(self.gradient[i])):>14.3g} "
                f"{self.gradient_ratio[i]:>10.3g} {self.sign_change_fraction[i]:>12.2f} "
                f"{self.mismatch[i]:>9.3g} {'rough' if self.rough[i] else 'smooth':>7}"
            )
        lines.append(
            f"(rough above: grad ratio {GRADIENT_RATIO_LIMIT:g}, sign changes "
            f"{SIGN_CHANGE_LIMIT:g}, mismatch {MISMATCH_LIMIT:g})"
        )
        lines.append(self.advice)
        return "\n".join(lines)

    def __str__(self) -> str:
        """The same as `summary()`."""
        return self.summary()


LogLikelihoodFn = Callable[[PRNGKey, Any], Array]


def surface(
    key: PRNGKey,
    log_likelihood_fn: LogLikelihoodFn,
    params: Any,
    *,
    direction: Any | None = None,
    radius: float | None = None,
    num_points: int = 16,
    num_keys: int = 16,
) -> SurfaceReport:
    """Check the fixed-key log-likelihood around `params` for roughness.

    Args:
        key: PRNG key; its first split is the "fixed key" (what NUTS would use), the others are
            the keys averaged over.
        log_likelihood_fn: `log_likelihood_fn(key, params) -> scalar`, differentiable in
            `params` (reverse mode).
        params: a float scalar, array or pytree of them (e.g. a dict), the point to check.
        direction: optional pytree like `params`: check only along it. Default: one direction
            per scalar entry of `params`.
        radius: half-length of the segment, in units of the direction. Default: 5% of the
            parameter's magnitude (at least 0.05), per direction.
        num_points: points on the segment, at least 5.
        num_keys: keys for the averaged slope, at least 2 (16 gives it a standard error of a
            quarter of the key-to-key spread).

    Returns:
        A `SurfaceReport`.

    Raises:
        TypeError: `log_likelihood_fn` not callable, non-floating `params`, or non-integer
            `num_points` / `num_keys`.
        ValueError: empty `params`, a `direction` of another structure or zero length, a
            non-positive `radius`, too few points or keys, or a `log_likelihood_fn` that
            does not return a scalar.
    """
    check_callable(
        "log_likelihood_fn", log_likelihood_fn, "log_likelihood_fn(key, params) -> scalar"
    )
    check_count("num_points", num_points, minimum=5)
    check_count("num_keys", num_keys, minimum=2)
    flat, unravel, names = _flatten(params)
    directions, radii, names = _directions(flat, unravel, names, direction, radius)
    fixed_key, *other_keys = jax.random.split(key, num_keys + 1)
    other_keys = jnp.stack(other_keys)

    def along(key, offset, unit):
        return log_likelihood_fn(key, unravel(flat + offset * unit))

    shape = jax.eval_shape(along, fixed_key, jnp.zeros((), flat.dtype), directions[0])
    if shape.shape != ():
        raise ValueError(
            f"log_likelihood_fn must return a scalar log-likelihood, got shape {shape.shape}."
        )

    fraction = jnp.linspace(-1.0, 1.0, num_points, dtype=flat.dtype)
    offsets = radii[:, None] * fraction[None, :]
    fixed = jax.vmap(jax.vmap(jax.value_and_grad(along, argnums=1), (None, 0, None)), (None, 0, 0))
    values, gradients = jax.jit(fixed)(fixed_key, offsets, directions)
    averaged = jax.vmap(jax.vmap(jax.vmap(along, (None, 0, None)), (0, None, None)), (None, 0, 0))
    many = np.asarray(jax.jit(averaged)(other_keys, offsets, directions), np.float64)
    return _report(names, offsets, values, gradients, many, num_keys)


def _report(names, offsets, values, gradients, many, num_keys) -> SurfaceReport:
    """The `SurfaceReport` of `surface`'s evaluations (`many`: the other keys' values)."""
    offsets = np.asarray(offsets, np.float64)
    values = np.asarray(values, np.float64)
    gradients = np.asarray(gradients, np.float64)
    centred = offsets - offsets.mean(axis=1, keepdims=True)
    # Least-squares slope of each key's values on the offsets: (D, M).
    slopes = np.einsum("dp,dmp->dm", centred, many) / np.sum(centred**2, axis=1)[:, None]
    averaged_slope = slopes.mean(axis=1)
    slope_spread = slopes.std(axis=1, ddof=1)
    slope_error = slope_spread / np.sqrt(num_keys)

    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.abs(averaged_slope) + slope_spread
        ratio = np.median(np.abs(gradients - averaged_slope[:, None]), axis=1) / scale
        signs = np.sign(gradients)
        sign_changes = np.mean(signs[:, 1:] * signs[:, :-1] < 0, axis=1)
        step = np.diff(offsets, axis=1)
        predicted = 0.5 * step * (gradients[:, 1:] + gradients[:, :-1])
        mismatch = np.max(np.abs(np.diff(values, axis=1) - predicted), axis=1)
        largest_jump = np.max(np.abs(np.diff(values, axis=1)), axis=1)
    finite = np.all(np.isfinite(values), axis=1) & np.all(np.isfinite(gradients), axis=1)
    finite &= np.all(np.isfinite(many), axis=(1, 2))
    ratio = np.where(np.isfinite(ratio), ratio, np.inf)
    rough = (
        ~finite
        | (ratio > GRADIENT_RATIO_LIMIT)
        | (sign_changes > SIGN_CHANGE_LIMIT)
        | ~(mismatch <= MISMATCH_LIMIT)
    )
    report = SurfaceReport(
        verdict="rough" if rough.any() else "smooth",
        names=names,
        offsets=offsets,
        log_likelihood=values,
        gradient=gradients,
        averaged_slope=averaged_slope,
        slope_error=slope_error,
        slope_spread=slope_spread,
        gradient_ratio=ratio,
        sign_change_fraction=sign_changes,
        mismatch=mismatch,
        largest_jump=largest_jump,
        rough=rough,
        advice="",
    )
    return report._replace(advice=_advice(report, finite))


def filter_surface(
    key: PRNGKey,
    model_fn: Callable[[Any], StateSpaceModel],
    observations: Array,
    params: Any,
    *,
    num_particles: int,
    resampler: Resampler | None = None,
    ess_threshold: float = 1.0,
    dtype: DTypeLike | None = None,
    direction: Any | None = None,
    radius: float | None = None,
    num_points: int = 16,
    num_keys: int = 16,
) -> SurfaceReport:
    """`surface` for `particle_filter(key, model_fn(params), observations, ...)`.

    Run it with the settings you will give `particle_factor` under NUTS (the same
    `num_particles`, `resampler`, `ess_threshold`), around plausible parameter values (e.g. a
    prior draw, an SVI or optimiser estimate).

    Args:
        key: PRNG key, as in `surface`.
        model_fn: `model_fn(params) -> StateSpaceModel`.
        observations: `(T, *observation_shape)`.
        params: the parameters to check around, as `model_fn` takes them.
        num_particles: $N$.
        resampler: default `resampling.diffusion()`.
        ess_threshold: see `particle_filter`.
        dtype: see `particle_filter`.
        direction: see `surface`.
        radius: see `surface`.
        num_points: see `surface`.
        num_keys: see `surface`.

    Returns:
        A `SurfaceReport`.

    Raises:
        TypeError: `model_fn` not callable or not returning a `StateSpaceModel`; and as
            `surface` and `particle_filter`.
        ValueError: as `surface` and `particle_filter`.
    """
    log_likelihood_fn = _filter_log_likelihood(
        model_fn,
        observations,
        num_particles=num_particles,
        resampler=resampler,
        ess_threshold=ess_threshold,
        dtype=dtype,
    )
    return surface(
        key,
        log_likelihood_fn,
        params,
        direction=direction,
        radius=radius,
        num_points=num_points,
        num_keys=num_keys,
    )


def _flatten(params: Any):
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params is empty: pass the parameter values to check around.")
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "params must be floating-point scalars or arrays (e.g. {'sv': 3.0}); got "
                f"a leaf of dtype {dtype}."
            )
    flat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    if flat.size == 0:
        raise ValueError("params has no entries: pass the parameter values to check around.")
    names = []
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in paths:
        label = ".".join(_entry_name(entry) for entry in path) or "params"
        for label_index in np.ndindex(np.shape(leaf)):
            names.append(label + (str(list(label_index)) if label_index else ""))
    return flat, unravel, tuple(names)


def _entry_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _directions(flat, unravel, names, direction, radius):
    if radius is not None:
        check_positive("radius", radius)
    if direction is None:
        directions = jnp.eye(flat.size, dtype=flat.dtype)
        magnitude = np.maximum(np.abs(np.asarray(flat, np.float64)), 1.0)
        radii = np.full(flat.size, radius) if radius is not None else 0.05 * magnitude
        return directions, jnp.asarray(radii, flat.dtype), names
    template = jax.tree.structure(unravel(flat))
    if jax.tree.structure(direction) != template:
        raise ValueError(
            f"direction must have the structure of params ({template}); got "
            f"{jax.tree.structure(direction)}."
        )
    try:
        unit, _ = ravel_pytree(jax.tree.map(lambda d: jnp.asarray(d, flat.dtype), direction))
    except (TypeError, ValueError) as error:
        raise ValueError(f"direction must have the shapes of params: {error}") from error
    if unit.shape != flat.shape:
        raise ValueError(
            f"direction has {unit.size} entries, params {flat.size}; give one per parameter."
        )
    length = float(jnp.linalg.norm(unit))
    if not (length > 0 and np.isfinite(length)):
        raise ValueError("direction must be finite and not all zero.")
    if radius is None:
        radius = 0.05 * max(1.0, float(jnp.linalg.norm(flat))) / length
    return unit[None, :], jnp.asarray([radius], flat.dtype), ("direction",)


def _advice(report: SurfaceReport, finite: np.ndarray) -> str:
    if report.verdict == "smooth":
        return (
            "Smooth around these values: the fixed-key gradient agrees with the averaged slope "
            "up to key noise and predicts the value changes, so NUTS/HMC on the fixed-key "
            "surrogate can move. Check again where the posterior lies (e.g. at posterior "
            "draws) and with a few filter keys."
        )
    parts = []
    worst = [name for name, bad in zip(report.names, report.rough, strict=True) if bad]
    if not finite.all():
        parts.append(
            "Some values or gradients are not finite: the parameters may lie outside the "
            "model's support, or the filter overflows there."
        )
    if np.any(report.gradient_ratio > GRADIENT_RATIO_LIMIT):
        parts.append(
            f"The fixed-key gradient is up to {np.nanmax(report.gradient_ratio):.3g} times "
            "further from the averaged slope than key noise explains: derivatives grow along "
            "particle histories (an expansive or multimodal transition)."
        )
    if np.any(report.sign_change_fraction > SIGN_CHANGE_LIMIT):
        parts.append(
            f"Its sign flips between up to {np.nanmax(report.sign_change_fraction):.0%} of "
            "neighbouring points."
        )
    if np.any(~(report.mismatch <= MISMATCH_LIMIT)):
        parts.append(
            f"Between neighbouring points the value changes by up to "
            f"{np.nanmax(report.mismatch):.3g} log-likelihood units more than the gradient "
            "predicts: jumps (index or ESS-triggered resampling) or wiggles finer than the "
            "grid, which make NUTS reject."
        )
    parts.append(
        f"NUTS will likely stall or diverge (rough: {', '.join(worst)}). Try, then run this "
        "check again: resampling.gradient_decay(resampler, factor) with factor 0 to 0.5 "
        "(damps the derivative through the particle history); a guided proposal "
        "(StateSpaceModel(proposal=...)) that uses the observation; more particles; "
        "ess_threshold=1.0 with a differentiable resampler (diffusion). See "
        "docs/roughness.md."
    )
    return " ".join(parts)
