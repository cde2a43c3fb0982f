"""Memory maps per compiled program on the CPU, and what `jax.clear_caches()` gives back (Linux).

Each program XLA compiles for the CPU maps its code into the process, and JAX keeps every
compiled program in its caches; Linux caps a process at `vm.max_map_count` maps (65530 by
default), and a process near the cap dies inside its next compilation. This script counts the
lines of `/proc/self/maps` before and after compiling a number of distinct small programs and
of distinct particle-filter gradients, and after `jax.clear_caches()`. It measures what the
test suite's guard against that cap relies on (`tests/conftest.py`), not the library.

    python tools/code_maps.py [--quick] [--out PATH]

Writes `tools/results/code_maps.{json,md}`.
"""

import argparse
import gc
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
import numpyro_diffres as ndr  # noqa: E402
from benchmarks._common import markdown_table, run_metadata, write_report  # noqa: E402
from benchmarks.models import ar1  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tools" / "results" / "code_maps.json"
FULL = {"small_programs": 300, "filter_programs": 20}
QUICK = {"small_programs": 40, "filter_programs": 1}


def num_maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def compile_small(count: int) -> None:
    """`count` distinct elementwise programs (one per input length)."""
    for i in range(count):
        jax.jit(lambda x: jnp.sin(x) * 2.0 + jnp.cos(x) ** 2)(jnp.ones(i + 1)).block_until_ready()


def compile_filters(count: int) -> None:
    """`count` distinct jitted filter gradients (one per particle count), run once each."""
    observations = jnp.sin(jnp.arange(10.0))

    def log_likelihood(phi, num_particles):
        return ndr.particle_filter(
            jax.random.PRNGKey(0),
            ar1(phi, 1.0, 0.5, initial_scale=1.0),
            observations,
            num_particles=num_particles,
        ).log_likelihood

    for i in range(count):
        gradient = jax.jit(jax.grad(log_likelihood), static_argnums=1)
        gradient(0.5, 8 + i).block_until_ready()


def measure(settings: dict) -> list[dict]:
    rows = []
    for label, compile_many, count in (
        ("small programs", compile_small, settings["small_programs"]),
        ("filter gradients", compile_filters, settings["filter_programs"]),
    ):
        jax.clear_caches()
        gc.collect()
        before = num_maps()
        compile_many(count)
        after = num_maps()
        jax.clear_caches()
        gc.collect()
        cleared = num_maps()
        rows.append(
            {
                "programs": label,
                "count": count,
                "maps_before": before,
                "maps_after": after,
                "maps_per_program": (after - before) / count,
                "maps_after_clear_caches": cleared,
            }
        )
    return rows


def render(report: dict) -> str:
    rows = [
        [
            r["programs"],
            r["count"],
            r["maps_before"],
            r["maps_after"],
            r["maps_per_program"],
            r["maps_after_clear_caches"],
        ]
        for r in report["rows"]
    ]
    headers = ["compiled", "count", "maps before", "maps after", "per program", "after clear"]
    return (
        "# Memory maps per compiled CPU program\n\n"
        + markdown_table(headers, rows)
        + "\n\nLinux caps a process at `vm.max_map_count` maps (65530 by default).\n"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    report = {"meta": run_metadata(quick=args.quick, **settings), "rows": measure(settings)}
    print(write_report(args.out, report, render))
    return report


if __name__ == "__main__":
    main()
