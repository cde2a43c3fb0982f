"""The documentation site: the strict build passes and every code block is valid Python."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MKDOCS = Path(sys.executable).parent / "mkdocs"
RESULTS = [
    ROOT / "benchmarks" / "results" / name
    for name in (
        "resampling.md",
        "scaling.md",
        "stability.md",
        "gradients.md",
        "gradients_speed.md",
        "series.md",
        "cost.md",
        "suite_timing.md",
    )
]

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def table_cells(text):
    return {
        cell.strip()
        for line in text.splitlines()
        if line.startswith("|")
        for cell in line.strip().strip("|").split("|")
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not MKDOCS.exists():
        pytest.skip(f"mkdocs is not installed next to {sys.executable} (pip install -e .[docs])")
    site_dir = tmp_path_factory.mktemp("site")
    completed = subprocess.run(
        [
            str(MKDOCS),
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert completed.returncode == 0, f"mkdocs build --strict failed:\n{completed.stderr[-5000:]}"
    return site_dir


def test_strict_build_renders_every_page(site):
    for page in PAGES:
        built = site / "index.html" if page.stem == "index" else site / page.stem / "index.html"
        assert built.exists(), f"{page.name} was not built"


def test_api_reference_documents_the_public_api(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in (
        "resampling.diffusion.diffusion",
        "resampling.index.systematic",
        "resampling.stop_gradient.stop_gradient",
        "resampling.soft.soft",
        "resampling.gumbel.gumbel_softmax",
        "resampling.optimal_transport.optimal_transport",
        "ssm.StateSpaceModel",
        "ssm.simulate",
        "filtering.particle_filter",
        "filtering.FilterResult",
        "primitives.particle_factor",
        "primitives.sample_trajectory",
        "linear_gaussian.kalman_log_likelihood",
        "resampling.adaptive.adaptive",
        "resampling.decay.gradient_decay",
        "filtering.init",
        "filtering.step",
        "smoothing.particle_smoother",
        "smoothing.forecast",
        "primitives.sample_latent_paths",
        "marginalize.marginalize",
        "diagnostics.filter_surface",
        "particle_counts.choose_num_particles",
        "particle_counts.choose_marginal_num_particles",
        "particle_counts.choose_pmmh_num_particles",
        "infer.pmmh.PMMH",
        "infer.pmmh.CorrelatedPMMH",
        "noise.noise_filter",
        "resampling.sorted.sorted_systematic",
        "resampling.noise_driven.noise_driven",
        "resampling.diffusion.Diffusion.from_noise",
    ):
        assert f'id="numpyro_diffres.{name}"' in html, name


def test_included_files_are_rendered(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    # The 30-second example is included from the README section markers.
    assert "kalman_log_likelihood" in index
    assert "--8&lt;--" not in index and "start:example" not in index
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert 'id="resampler-benchmark"' in benchmarks
    assert "diffusion_per_particle_transposed" in benchmarks


def test_python_blocks_compile():
    blocks = [
        (page, number, code)
        for page in PAGES
        for number, code in enumerate(PYTHON_BLOCK.findall(page.read_text(encoding="utf-8")))
    ]
    assert len(blocks) >= 10, "expected the getting-started page's code blocks"
    for page, number, code in blocks:
        compile(code, f"{page.name}, python block {number}", "exec")


@pytest.mark.parametrize("page", ["index", "getting-started", "concepts", "examples"])
def test_quoted_benchmark_numbers_are_the_committed_ones(page):
    """Measured numbers in the prose and tables come from the committed result files."""
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    committed = set()
    for results in RESULTS:
        committed |= table_cells(results.read_text(encoding="utf-8"))
    quoted = {cell for cell in table_cells(text) if re.fullmatch(r"\d+\.\d+", cell)}
    quoted |= set(re.findall(r"(\d+(?:\.\d+)?) (?:ms|MiB|s)\b", text))
    invented = sorted(quoted - committed)
    assert not invented, f"{page}.md quotes numbers that no results file has: {invented}"


def test_concepts_page_quotes_the_benchmarks():
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    assert len(re.findall(r"\d (?:ms|MiB|s)\b", text)) > 10
