r"""Scaling benchmark: what users feel (NUTS end to end), gradient memory and time against N.

Sections (choose with `--sections`):

* `nuts`: NUTS (300 warmup + 400 samples, one chain) on an AR(1)-plus-noise model, T = 30,
  with the diffusion particle-filter likelihood at several (N, K, dtype) settings, next to NUTS
  on the exact Kalman likelihood: wall time up to `get_samples()`, posterior means and SDs
  against the exact posterior (in exact-posterior SDs), divergences, and whether the setting
  meets the target (under 60 s, means within 0.3 exact SD, SDs within 30%). A "mixed"
  setting runs NUTS in float64 with the filter's particles in float32. `--nuts-settings
  64,8,mixed --update` reruns only the named rows into the committed report.
* `gradient`: `value_and_grad` of the filter log-likelihood on a linear-Gaussian model with
  d = 4, T = 100, for diffusion, optimal-transport and stop-gradient(systematic) resampling:
  XLA's compiled temporary memory for N in {256, ..., 16384} (read from the compiled
  executable, not run), and the measured time where `--max-run-particles` and
  `--max-gradient-call-seconds` allow.
* `resampler`: the diffusion resampler alone, forward, d = 4, for N up to `--max-resampler-n`,
  with the attention's block size and its compiled memory.
* `accuracy`: resampled-mean error against forward time, diffusion (K in {4, 8, 16}) and
  optimal transport (epsilon in {0.1, 0.2, 0.4, 0.8}) at N in {1024, 4096, 8192}, on the
  conjugate Gaussian example of `benchmarks/resampling.py` (prior $N(0, I_d)$, likelihood
  $N(y; x, 0.5 I_d)$, exact posterior mean $y / 1.5$), and the comparison at equal error.
* `precision`: the filter log-likelihood and its gradient in float64, float32 (with the same
  noise, x64 enabled), mixed precision (`dtype=float32` particles, float64 densities) and
  float32 with x64 disabled, same keys and over several keys, for the AR(1) model of `nuts`
  and the linear-Gaussian model of `gradient`.

Every time is a median of jit-compiled calls after compilation and a warm-up call
(`benchmarks._common.time_call`, `repeats` calls; a call that takes more than 2 s is timed once,
without a warm-up call: `_shared._time_calls`). Where a call is predicted (from the largest smaller
N measured, as $t (N / N')^2$) to exceed its section's limit, it is not run and the row says
so; predicted times are labelled as estimates.

    python -m benchmarks scaling                        # everything, default sizes
    python -m benchmarks scaling --sections nuts --quick

Prints markdown and writes JSON (and the markdown beside it, `render` of the JSON) under
`benchmarks/results/` (`benchmarks._common.write_report`).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file, too
from benchmarks._common import (  # noqa: E402
    finish_metadata,
    load_average,
    run_metadata,
    write_report,
)
from benchmarks.scaling.accuracy import _accuracy_markdown, accuracy_section  # noqa: E402
from benchmarks.scaling.gradient import _gradient_markdown, gradient_section  # noqa: E402
from benchmarks.scaling.nuts import NUTS_PRECISIONS, NUTS_SETTINGS, _nuts_markdown, nuts_section  # noqa: E402
from benchmarks.scaling.precision import PRECISION_MODELS, _precision_markdown, precision_section  # noqa: E402
from benchmarks.scaling.resampler import _resampler_markdown, resampler_section  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "scaling.json"


def _merge_rows(old_rows, new_rows, date):
    """`old_rows` with the rows of the same likelihood replaced by `new_rows` (dated)."""
    new = {row["likelihood"]: row | {"date": date} for row in new_rows}
    merged = [new.pop(row["likelihood"], row) for row in old_rows]
    return merged + list(new.values())


def render(report):
    """The markdown of a report (`meta` from `_common.run_metadata`, one per rerun too)."""
    meta = report["meta"]
    loads = ", ".join(
        f"{section} {load[0]:.1f}" for section, load in report["section_loads"].items()
    )
    lines = [
        "# Scaling benchmark",
        "",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_count']} CPUs), jax "
        f"{meta['jax_version']}; total {meta['total_seconds']:.0f} s. Load average (1, 5, 15 "
        f"min) at start / end: {meta['load_start']} / {meta['load_end']}; 1-minute load "
        f"when each section started: {loads}. Other processes share the CPUs: compare within "
        "this run only.",
        "",
    ]
    for rerun in report.get("reruns", []):
        rerun_meta = rerun["meta"]
        lines += [
            f"Section{'s' if len(rerun['sections']) > 1 else ''} "
            f"{', '.join(rerun['sections'])}"
            + (
                f" (NUTS rows {', '.join(rerun['nuts_rows'])}; NUTS on the exact likelihood "
                f"took {rerun['exact_seconds']:.1f} s in that run)"
                if rerun.get("nuts_rows")
                else ""
            )
            + f" rerun {rerun_meta['date']} ({rerun_meta['total_seconds']:.0f} s, "
            f"load {rerun_meta['load_start']} / {rerun_meta['load_end']}) with the code of that "
            f"date; the other {'rows and ' if rerun.get('nuts_rows') else ''}sections are from "
            "the run above.",
            "",
        ]
    if report.get("cuts"):
        lines += ["What this run left out, and why:", ""]
        lines += [f"- {cut}" for cut in report["cuts"]]
        lines.append("")
    if report.get("nuts"):
        lines += _nuts_markdown(report)
    if report.get("gradient"):
        lines += _gradient_markdown(report)
    if report.get("resampler"):
        lines += _resampler_markdown(report)
    if report.get("accuracy"):
        lines += _accuracy_markdown(report, report["settings"]["verdict_min_n"])
    if report.get("precision"):
        lines += _precision_markdown(report)
    return "\n".join(lines)


def _cuts(report):
    """One line per row that was not (fully) measured, from the notes the sections left."""
    cuts = []
    for row in report.get("gradient", []):
        if row["value_and_grad_ms"] is None:
            cuts.append(f"gradient, {row['method']}, N={row['N']}: {row['note']}")
    for row in report.get("resampler", []):
        if row.get("forward_ms") is None:
            cuts.append(f"resampler, N={row['N']}: {row['note']}")
    for row in report.get("accuracy", {}).get("rows", []):
        if "rms_error" not in row:
            cuts.append(f"accuracy, {row['method']} {row['setting']}, N={row['N']}: {row['note']}")
    return cuts


SECTIONS = {
    "nuts": nuts_section,
    "gradient": gradient_section,
    "resampler": resampler_section,
    "accuracy": accuracy_section,
    "precision": precision_section,
}


def _nuts_setting(text, parser):
    """`"N,K,PRECISION"` -> `(N, K, PRECISION)`, or a usage error saying what is wrong."""
    parts = text.split(",")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        parser.error(f"--nuts-settings takes N,K,PRECISION such as 64,8,mixed; got {text!r}.")
    if parts[2] not in NUTS_PRECISIONS:
        parser.error(f"--nuts-settings precision must be one of {NUTS_PRECISIONS}; got {text!r}.")
    return int(parts[0]), int(parts[1]), parts[2]


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun only --sections, keeping the other sections of the report in --out",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up")
    parser.add_argument(
        "--nuts-settings",
        dest="nuts_setting_text",
        nargs="+",
        default=None,
        metavar="N,K,PRECISION",
        help=f"NUTS settings to run, PRECISION one of {NUTS_PRECISIONS}; with --update only "
        "these rows are replaced (the exact row is kept)",
    )
    parser.add_argument("--num-time-steps", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--gradient-time-steps", type=int, default=100)
    parser.add_argument("--gradient-sizes", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--max-run-particles", type=int, default=16384)
    parser.add_argument("--max-gradient-call-seconds", type=float, default=60.0)
    parser.add_argument("--ot-epsilon", type=float, default=0.5)
    parser.add_argument(
        "--resampler-sizes", nargs="+", type=int, default=[1024, 4096, 16384, 65536]
    )
    parser.add_argument("--max-resampler-n", type=int, default=65536)
    parser.add_argument("--max-resampler-call-seconds", type=float, default=300.0)
    parser.add_argument("--accuracy-sizes", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--accuracy-num-steps", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--accuracy-epsilons", nargs="+", type=float, default=[0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--accuracy-seeds", type=int, default=4)
    parser.add_argument("--accuracy-dimension", type=int, default=4)
    parser.add_argument(
        "--max-accuracy-seconds",
        type=float,
        default=150.0,
        help="skip a setting whose estimated time over all seeds is larger",
    )
    parser.add_argument("--verdict-min-n", type=int, default=4096)
    parser.add_argument("--precision-keys", type=int, default=16)
    parser.add_argument("--precision-ar1", nargs=2, type=int, default=[64, 4], help="N K")
    parser.add_argument("--precision-linear-gaussian-particles", type=int, default=256)
    parser.add_argument(
        "--precision-models",
        nargs="+",
        default=list(PRECISION_MODELS),
        choices=PRECISION_MODELS,
        help="models of the precision section",
    )
    args = parser.parse_args(argv)
    if args.update and not args.out.exists():
        parser.error(f"--update keeps the other sections of {args.out}, which does not exist.")
    args.nuts_settings = NUTS_SETTINGS
    if args.nuts_setting_text:
        args.nuts_settings = [_nuts_setting(text, parser) for text in args.nuts_setting_text]
    if args.quick:
        # Smoke test: compiling, not running, takes the time, so one configuration per
        # code path: two NUTS rows (float32, mixed) beside the exact one, one N per gradient
        # method (256: its temporary memory is checked), one resampler N run and one only
        # listed, one diffusion and one OT accuracy setting, the AR(1) precision model.
        args.num_time_steps, args.num_warmup, args.num_samples = 5, 10, 10
        quick_nuts = [(8, 2, "float32"), (8, 2, "mixed")]
        args.nuts_settings = args.nuts_settings if args.nuts_setting_text else quick_nuts
        args.gradient_time_steps, args.gradient_sizes, args.max_run_particles = 5, [256], 256
        args.resampler_sizes, args.max_resampler_n = [64, 128], 64
        args.accuracy_sizes, args.accuracy_num_steps = [64], [2]
        args.accuracy_epsilons, args.accuracy_seeds, args.verdict_min_n = [0.8], 2, 64
        args.precision_keys, args.precision_ar1 = 2, [8, 2]
        args.precision_linear_gaussian_particles = 32
        args.precision_models = ["ar1"]
    return args


def main(argv=None):
    args = parse_arguments(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",) and not callable(v)}
    # This run's metadata: the report's own, or a rerun's (`--update`).
    meta = run_metadata()
    # Rerunning named NUTS settings into a committed report replaces only their rows.
    merge_nuts = args.update and "nuts" in args.sections and bool(args.nuts_setting_text)
    if args.update:
        # Keep the other sections of the committed run; record when and how these were rerun.
        report = json.loads(args.out.read_text())
        if merge_nuts:
            for name in ("num_time_steps", "num_warmup", "num_samples"):
                if report["settings"][name] != getattr(args, name):
                    raise SystemExit(
                        f"--update of NUTS rows needs the report's {name}="
                        f"{report['settings'][name]} (got {getattr(args, name)}): rows of "
                        "one table must share their settings."
                    )
    else:
        report = {"meta": meta, "settings": settings, "section_loads": {}}
    for name in args.sections:
        report["section_loads"][name] = load_average()
        rows = SECTIONS[name](args)
        if merge_nuts and name == "nuts":
            # Only the named settings were rerun: they replace their rows. The exact row stays
            # (the exact posterior is the same draw for the same seed; its time is noted).
            exact_seconds = rows[0]["seconds"]
            rows = _merge_rows(report["nuts"], rows[1:], meta["date"])
        report[name] = rows
    if args.update:
        rerun = {"sections": args.sections}
        if merge_nuts:
            rerun["nuts_rows"] = [f"N={n} K={k} {p}" for n, k, p in args.nuts_settings]
            rerun["exact_seconds"] = exact_seconds
        rerun |= {"settings": settings, "meta": finish_metadata(meta)}
        report.setdefault("reruns", []).append(rerun)
    report["cuts"] = _cuts(report)
    print(write_report(args.out, report, render))
    return report


if __name__ == "__main__":
    main()
