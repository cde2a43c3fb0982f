r"""Stress test: random models, parameters and data through every resampler.

Each case draws a model structure, a resampler and parameters, simulates data from that model
and evaluates the particle-filter log-likelihood and its gradient with respect to every
parameter (jit-compiled, float32). The model is

$$x_0 \sim N(0, s_0^2 I), \quad x_t = A x_{t-1} + q\,\varepsilon_t, \quad
y_t \mid x_t \sim g(y_t \mid H x_t),$$

with $g$ Gaussian ($N(Hx, r^2 I)$), Student-t ($\nu$ degrees of freedom, scale $r$) or Poisson
(rate $\exp(b + Hx)$), state dimension 1 or 3 and observation dimension 1 or 2. $A$ has
spectral radius $\rho \sim U(0, 0.99)$; $q$, $r$ and $s_0$ are log-uniform on
$[10^{-3}, 10^{3}]$, $\nu$ log-uniform on $[0.5, 50]$. For Poisson, $H$ is divided by the
state's stationary standard deviation so that log-rates are of order one (otherwise the
simulated counts themselves overflow).

Parameters are traced arguments, so every (structure, resampler) pair compiles once. Each case
is classified:

* `crash`: an exception; `hang`: no answer within `--timeout` seconds (the worker process is
  killed and restarted);
* `nan` / `+inf`: a NaN or $+\infty$ log-likelihood (always a bug);
* `-inf expected finite`: $-\infty$ although the data are finite and the parameters valid (the
  exact likelihood is positive; a particle filter may still lose every particle);
* `gradient non-finite`: a NaN or infinite gradient entry (the defined behaviour is a finite
  gradient, zero at $-\infty$).

Usage:
    python benchmarks/stress.py                      # 1,000 cases, results/stress.{json,md}
    python benchmarks/stress.py --quick --out /tmp/s.json   # smoke test: 4 cases, 2 compiles
"""

import argparse
import json
import math
import multiprocessing
import queue
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
from benchmarks._common import run_metadata, write_report  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "stress.json"

# (emission, state dimension, observation dimension).
STRUCTURES = (
    ("gaussian", 1, 1),
    ("gaussian", 3, 2),
    ("student", 1, 1),
    ("student", 3, 2),
    ("poisson", 1, 1),
    ("poisson", 3, 2),
)
RESAMPLERS = (
    "diffusion",
    "multinomial",
    "systematic",
    "stratified",
    "stop_gradient",
    "soft",
    "gumbel_softmax",
    "optimal_transport",
)
QUICK_STRUCTURES = (("gaussian", 1, 1),)
QUICK_RESAMPLERS = ("diffusion", "systematic")
OUTCOMES = (
    "ok",
    "-inf expected finite",
    "-inf (invalid data)",
    "nan",
    "+inf",
    "gradient non-finite",
    "crash",
    "hang",
)
BUGS = ("nan", "+inf", "-inf expected finite", "gradient non-finite", "crash", "hang")


def draw_case(rng, index, structures, resamplers):
    """One case: structure and resampler (balanced round-robin) and its parameters."""
    emission, state_dim, observation_dim = structures[index % len(structures)]
    resampler = resamplers[(index // len(structures)) % len(resamplers)]
    matrix = rng.standard_normal((state_dim, state_dim))
    radius = max(abs(np.linalg.eigvals(matrix)))
    coefficient = rng.uniform(0.0, 0.99)
    transition = coefficient * matrix / radius
    noise = 10.0 ** rng.uniform(-3.0, 3.0, size=3)  # q, r, s0
    emission_matrix = rng.standard_normal((observation_dim, state_dim))
    if emission == "poisson":
        # Stationary variance of one coordinate is at most q^2 / (1 - rho^2) + s0^2.
        stationary = math.sqrt(noise[0] ** 2 / (1.0 - coefficient**2) + noise[2] ** 2)
        emission_matrix = emission_matrix / (stationary * math.sqrt(state_dim))
    return {
        "index": index,
        "emission": emission,
        "state_dim": state_dim,
        "observation_dim": observation_dim,
        "resampler": resampler,
        "params": {
            "transition": transition.tolist(),
            "q": float(noise[0]),
            "r": float(noise[1]),
            "s0": float(noise[2]),
            "emission_matrix": emission_matrix.tolist(),
            "offset": float(rng.uniform(-2.0, 3.0)),
            "df": float(10.0 ** rng.uniform(math.log10(0.5), math.log10(50.0))),
        },
        "seed": int(rng.integers(0, 2**31 - 1)),
        "spectral_radius": coefficient,
    }


# --- worker side ------------------------------------------------------------------------------


def _build(emission):
    import jax.numpy as jnp
    import numpyro.distributions as dist

    import numpyro_diffres as ndr

    def model(params):
        state_dim = params["transition"].shape[0]
        initial = dist.Normal(jnp.zeros(state_dim), params["s0"]).to_event(1)

        def transition(x, t):
            return dist.Normal(params["transition"] @ x, params["q"]).to_event(1)

        if emission == "gaussian":

            def emit(x, t):
                return dist.Normal(params["emission_matrix"] @ x, params["r"]).to_event(1)

        elif emission == "student":

            def emit(x, t):
                loc = params["emission_matrix"] @ x
                return dist.StudentT(params["df"], loc, params["r"]).to_event(1)

        else:

            def emit(x, t):
                log_rate = params["offset"] + params["emission_matrix"] @ x
                return dist.Poisson(jnp.exp(log_rate)).to_event(1)

        return ndr.StateSpaceModel(initial, transition, emit)

    return model


def _resampler(name):
    from numpyro_diffres import resampling

    return {
        "diffusion": resampling.diffusion,
        "multinomial": resampling.multinomial,
        "systematic": resampling.systematic,
        "stratified": resampling.stratified,
        "stop_gradient": resampling.stop_gradient,
        "soft": resampling.soft,
        "gumbel_softmax": resampling.gumbel_softmax,
        "optimal_transport": resampling.optimal_transport,
    }[name]()


def _worker(tasks, results, num_steps, num_particles):
    """Evaluate cases from `tasks` until `None`; one compiled function per pair."""
    import warnings

    import jax
    import jax.numpy as jnp

    import numpyro_diffres as ndr

    warnings.simplefilter("ignore")
    compiled, simulators = {}, {}

    while (case := tasks.get()) is not None:
        start = time.perf_counter()
        try:
            key = (case["emission"], case["state_dim"], case["observation_dim"])
            model = _build(case["emission"])
            if key not in simulators:
                simulators[key] = jax.jit(
                    lambda params, k, model=model: ndr.simulate(k, model(params), num_steps)
                )
            pair = (*key, case["resampler"])
            if pair not in compiled:
                resampler = _resampler(case["resampler"])

                def log_likelihood(params, observations, k, model=model, resampler=resampler):
                    result = ndr.particle_filter(
                        k,
                        model(params),
                        observations,
                        num_particles=num_particles,
                        resampler=resampler,
                    )
                    return result.log_likelihood

                compiled[pair] = jax.jit(jax.value_and_grad(log_likelihood))
            params = {k: jnp.asarray(v, jnp.float32) for k, v in case["params"].items()}
            data_key, filter_key = jax.random.split(jax.random.PRNGKey(case["seed"]))
            _, observations = simulators[key](params, data_key)
            observations = np.asarray(observations)
            value, gradient = compiled[pair](params, jnp.asarray(observations), filter_key)
            value = float(value)
            leaves = jax.tree.leaves(gradient)
            gradient_finite = all(bool(np.all(np.isfinite(np.asarray(g)))) for g in leaves)
            gradient_norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in leaves))
            data_finite = bool(np.all(np.isfinite(observations)))
            results.put(
                {
                    "index": case["index"],
                    "log_likelihood": value,
                    "gradient_finite": gradient_finite,
                    "gradient_norm": gradient_norm,
                    "data_finite": data_finite,
                    "seconds": time.perf_counter() - start,
                }
            )
        except Exception as error:  # noqa: BLE001 - every exception is a finding
            results.put(
                {
                    "index": case["index"],
                    "error": f"{type(error).__name__}: {str(error)[:300]}",
                    "seconds": time.perf_counter() - start,
                }
            )


# --- parent side ------------------------------------------------------------------------------


def classify(record):
    """The outcome of one case (see the module docstring)."""
    if "error" in record:
        return "crash"
    if record.get("hang"):
        return "hang"
    value = record["log_likelihood"]
    if math.isnan(value):
        return "nan"
    if value == math.inf:
        return "+inf"
    if not record["gradient_finite"]:
        return "gradient non-finite"
    if value == -math.inf:
        return "-inf expected finite" if record["data_finite"] else "-inf (invalid data)"
    return "ok"


class Pool:
    """One worker process fed case by case, replaced when a case exceeds the timeout."""

    def __init__(self, num_steps, num_particles):
        self.context = multiprocessing.get_context("spawn")
        self.arguments = (num_steps, num_particles)
        self.process = None
        self.restarts = 0
        self._start()

    def _start(self):
        self.tasks = self.context.Queue()
        self.results = self.context.Queue()
        self.process = self.context.Process(
            target=_worker, args=(self.tasks, self.results, *self.arguments), daemon=True
        )
        self.process.start()

    def run(self, case, timeout):
        """The worker's record for `case`, or a `hang` record after `timeout` seconds."""
        self.tasks.put(case)
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            self.process.join()
            self.restarts += 1
            self._start()
            return {"index": case["index"], "hang": True, "seconds": timeout}

    def close(self):
        """Stop the worker (killed if it does not finish within 30 s)."""
        self.tasks.put(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def summarise(cases, records):
    """Counts per outcome, overall and per resampler and per emission."""
    outcome = {r["index"]: classify(r) for r in records}

    def table(key):
        groups = {}
        for case in cases:
            groups.setdefault(case[key], Counter())[outcome[case["index"]]] += 1
        return {name: {o: counts.get(o, 0) for o in OUTCOMES} for name, counts in groups.items()}

    total = Counter(outcome.values())
    return {
        "total": {o: total.get(o, 0) for o in OUTCOMES},
        "bugs": sum(total.get(o, 0) for o in BUGS),
        "by_resampler": table("resampler"),
        "by_emission": table("emission"),
    }


def slim_case(case):
    """One case for the report: the scalars that identify and describe it.

    The matrices are left out (they are redrawn exactly from `--seed` by `draw_case`).
    """
    params = case["params"]
    keep = ("index", "emission", "state_dim", "observation_dim", "resampler", "seed")
    measured = ("outcome", "log_likelihood", "gradient_norm", "data_finite", "seconds", "error")
    return {
        **{k: case[k] for k in keep},
        **{k: params[k] for k in ("q", "r", "s0", "df", "offset")},
        "spectral_radius": case["spectral_radius"],
        **{k: case[k] for k in measured if k in case},
    }


def render(report):
    """The markdown of a report: outcome counts by resampler, by emission and in total."""
    meta = report["meta"]
    summary = report["summary"]
    config = report["config"]
    lines = [
        "# Stress test",
        "",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_count']} CPUs), "
        f"jax {meta['jax_version']}, float32; {config['cases']} cases, T={config['num_steps']}, "
        f"N={config['num_particles']}, per-case timeout {config['timeout']} s; "
        f"total {meta['total_seconds']:.0f} s, worker restarts {report['worker_restarts']}.",
        "",
        "Random models (Gaussian / Student-t / Poisson emissions, state dimension 1 or 3, "
        "observation dimension 1 or 2), noise scales log-uniform on [1e-3, 1e3], data "
        "simulated from each model, every resampler; log-likelihood and gradient with respect "
        "to every parameter. See `benchmarks/stress.py` for the outcome definitions.",
        "",
        f"**Bugs (nan, +inf, -inf expected finite, gradient non-finite, crash, hang): "
        f"{summary['bugs']} of {config['cases']}.**",
        "",
    ]
    for title, key in (("By resampler", "by_resampler"), ("By emission", "by_emission")):
        lines += [f"## {title}", "", "| | " + " | ".join(OUTCOMES) + " |"]
        lines.append("|---|" + "---:|" * len(OUTCOMES))
        for name, counts in sorted(summary[key].items()):
            lines.append(f"| {name} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
        lines.append("")
    total = summary["total"]
    lines += [
        "## Total",
        "",
        "| " + " | ".join(OUTCOMES) + " |",
        "|" + "---:|" * len(OUTCOMES),
        "| " + " | ".join(str(total[o]) for o in OUTCOMES) + " |",
        "",
    ]
    if report["findings"]:
        lines += ["## Cases that are not ok", ""]
        for finding in report["findings"][:50]:
            lines.append(f"- {json.dumps(finding)}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="few cases, small T and N")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    structures, resamplers = STRUCTURES, RESAMPLERS
    num_steps, num_particles, num_cases = 20, 32, args.cases
    if args.quick:
        structures, resamplers = QUICK_STRUCTURES, QUICK_RESAMPLERS
        num_steps, num_particles, num_cases = 8, 8, min(args.cases, 4)

    rng = np.random.default_rng(args.seed)
    cases = [draw_case(rng, i, structures, resamplers) for i in range(num_cases)]
    # Grouped by (structure, resampler): each compiled function is used right after compiling.
    order = sorted(cases, key=lambda c: (c["emission"], c["state_dim"], c["resampler"], c["index"]))
    meta = run_metadata()
    start = time.perf_counter()
    pool = Pool(num_steps, num_particles)
    records = []
    try:
        for done, case in enumerate(order, 1):
            record = pool.run(case, args.timeout)
            records.append(record)
            if done % 50 == 0 or done == len(order):
                print(f"{done}/{len(order)} cases, {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        pool.close()

    by_index = {c["index"]: c for c in cases}
    findings = []
    for record in sorted(records, key=lambda r: r["index"]):
        outcome = classify(record)
        record["outcome"] = outcome
        if outcome != "ok":
            case = by_index[record["index"]]
            findings.append(
                {
                    "index": case["index"],
                    "outcome": outcome,
                    "emission": case["emission"],
                    "dims": [case["state_dim"], case["observation_dim"]],
                    "resampler": case["resampler"],
                    "q": case["params"]["q"],
                    "r": case["params"]["r"],
                    "s0": case["params"]["s0"],
                    "rho": case["spectral_radius"],
                    "error": record.get("error"),
                }
            )

    report = {
        "meta": meta,
        "worker_restarts": pool.restarts,
        "config": {
            "cases": num_cases,
            "quick": args.quick,
            "num_steps": num_steps,
            "num_particles": num_particles,
            "timeout": args.timeout,
            "seed": args.seed,
            "structures": [list(s) for s in structures],
            "resamplers": list(resamplers),
            "dtype": "float32",
        },
        "summary": summarise(cases, records),
        "findings": findings,
        "cases": [
            slim_case({**by_index[r["index"]], **r})
            for r in sorted(records, key=lambda r: r["index"])
        ],
    }
    write_report(args.out, report, render)
    summary = report["summary"]
    print(json.dumps(summary["total"]), f"bugs: {summary['bugs']}", flush=True)
    return report


if __name__ == "__main__":
    main()
