"""Every example runs end to end at tiny settings, writes its figure and returns finite numbers."""

import importlib.util
import math
from pathlib import Path

import jax
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUIET = ["--no-progress"]


@pytest.fixture(autouse=True)
def restore_x64():
    # Some examples switch float64 on globally, as a script would; keep the other tests' dtype.
    previous = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", previous)


def load(stem):
    spec = importlib.util.spec_from_file_location(f"example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(stem, arguments, tmp_path):
    results = load(stem).main([*arguments, "--out", str(tmp_path)])
    figure = tmp_path / f"{stem}.png"
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert results["figure"] == str(figure)
    numbers = {k: v for k, v in results.items() if k != "figure"}
    assert numbers
    for name, value in numbers.items():
        assert math.isfinite(value), f"{name} = {value}"
    return numbers


def test_why_diffusion(tmp_path):
    steps = run(
        "why_diffusion",
        ["--num-steps", "20", "--num-particles", "32", "--num-grid", "201"]
        + ["--resamplers", "diffusion,multinomial,systematic"],
        tmp_path,
    )
    assert set(steps) == {"exact", "diffusion", "multinomial", "systematic"}
    # Smooth under a fixed key: diffusion steps like the exact curve; index resampling jumps
    # (measured at these settings: 1.0x, 10.7x and 12.5x the exact median step).
    assert steps["diffusion"] < 1.5 * steps["exact"]
    assert steps["multinomial"] > 5 * steps["diffusion"]
    assert steps["systematic"] > 5 * steps["diffusion"]


def test_linear_gaussian(tmp_path):
    results = run(
        "linear_gaussian",
        ["--num-steps", "20", "--num-particles", "8", "--num-warmup", "30", "--num-samples", "30"]
        + QUIET,
        tmp_path,
    )
    assert -0.99 < results["theta_1_mean"] < 0.99
    assert -0.99 < results["theta_1_exact_mean"] < 0.99
    assert results["theta_2_mean"] > 0 and results["theta_2_exact_mean"] > 0
    assert results["theta_1_sd"] > 0 and results["theta_2_sd"] > 0


def test_stochastic_volatility(tmp_path):
    results = run(
        "stochastic_volatility",
        ["--num-steps", "20", "--num-particles", "8", "--svi-steps", "20"]
        + ["--num-warmup", "10", "--num-samples", "10", "--num-filtered", "5"]
        + QUIET,
        tmp_path,
    )
    assert -1 < results["phi_mean"] < 1 and -1 < results["phi_svi"] < 1
    assert results["sigma_mean"] > 0
    for name in ("coverage", "smoothed_coverage", "forecast_coverage"):
        assert 0 <= results[name] <= 1


def test_lotka_volterra(tmp_path):
    results = run(
        "lotka_volterra",
        ["--num-particles", "8", "--substeps", "2", "--svi-steps", "10"]
        + ["--num-warmup", "10", "--num-samples", "10", "--num-filtered", "5"]
        + QUIET,
        tmp_path,
    )
    for name in ("alpha", "gamma", "hare_equilibrium", "lynx_equilibrium", "tau", "sigma"):
        assert results[f"{name}_mean"] > 0
    assert results["beta_mean"] > 0 and results["delta_mean"] > 0
    assert 0 <= results["record_coverage"] <= 1
    assert 0 <= results["forecast_coverage"] <= 1


def test_lotka_volterra_data():
    years, pelts = load("lotka_volterra").load_data()
    assert years.tolist() == list(range(1900, 1921))
    assert pelts.shape == (21, 2)
    assert pelts[0].tolist() == [30.0, 4.0] and pelts[-1].tolist() == [24.7, 8.6]


def test_blackjax_nuts(tmp_path):
    results = run(
        "blackjax_nuts",
        ["--num-steps", "20", "--num-particles", "8", "--num-warmup", "30", "--num-samples", "30"]
        + QUIET,
        tmp_path,
    )
    for sampler in ("numpyro", "blackjax", "exact"):
        assert -0.99 < results[f"theta_1_{sampler}_mean"] < 0.99
        assert results[f"theta_2_{sampler}_mean"] > 0
    assert results["theta_1_blackjax_ess"] > 0
