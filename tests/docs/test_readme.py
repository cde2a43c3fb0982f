"""The README: its example runs, its links resolve, its numbers are the committed ones."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESAMPLING_RESULTS = ROOT / "benchmarks" / "results" / "resampling.md"
SCALING_RESULTS = ROOT / "benchmarks" / "results" / "scaling.md"
LGSSM_RESULTS = ROOT / "benchmarks" / "results" / "lgssm.md"
LGSSM_100_RESULTS = ROOT / "benchmarks" / "results" / "lgssm_100.md"

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
NUMBER = r"(-?\d+(?:\.\d+)?)"


def readme_text():
    return README.read_text(encoding="utf-8")


def section(text, heading):
    """The body of a `## heading` section, up to the next `## ` heading."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def table_cells(text):
    return {
        cell.strip()
        for line in text.splitlines()
        if line.startswith("|")
        for cell in line.strip().strip("|").split("|")
    }


@pytest.fixture(scope="module")
def example_output(tmp_path_factory):
    blocks = PYTHON_BLOCK.findall(readme_text())
    assert blocks, "README.md has no python code block"
    script = tmp_path_factory.mktemp("readme") / "readme_example.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, (
        f"README example failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
    )
    return completed.stdout


def test_example_runs_and_prints_both_lines(example_output):
    assert "particle filter: log p(y | phi=0.8) =" in example_output
    assert "Kalman (exact):  log p(y | phi=0.8) =" in example_output


def test_example_agrees_with_the_exact_likelihood(example_output):
    pattern = rf"log p\(y \| phi=0.8\) = {NUMBER}, d/dphi = {NUMBER}"
    particle_line, exact_line = (
        next(line for line in example_output.splitlines() if line.startswith(prefix))
        for prefix in ("particle filter:", "Kalman (exact):")
    )
    value, gradient = map(float, re.search(pattern, particle_line).groups())
    exact_value, exact_gradient = map(float, re.search(pattern, exact_line).groups())
    # Over 100 filter keys at the example's settings (N=64, T=25, float32) the estimate had
    # standard deviation 0.81 and the gradient 2.8; allow about 4 of each. A log N offset in
    # the normalisation (log 64 = 4.2) would fail the first check.
    assert abs(value - exact_value) < 3.5
    assert abs(gradient - exact_gradient) < 11.5


def test_setup_commands_are_make_demo_and_make_test():
    setup = section(readme_text(), "Set up and run on a fresh machine")
    commands = re.findall(r"^(make \w+)", setup, re.MULTILINE)
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "docs", "bench"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no {target}"


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme_text())
    local = [link for link in links if "://" not in link]
    assert local, "expected links into docs/ and benchmarks/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_headline_numbers_come_from_the_committed_results():
    headline = section(readme_text(), "Headline numbers")
    resampler_part, nuts_part = headline.split("### NUTS end to end")
    results = RESAMPLING_RESULTS.read_text(encoding="utf-8")
    committed = table_cells(results)
    quoted = set()
    for cell in table_cells(resampler_part):
        value = cell.removesuffix(" ms")
        if re.fullmatch(r"\d+(?:\.\d+)?x?", value):
            quoted.add(value)
    quoted |= set(re.findall(r"(\d+(?:\.\d+)?) ms", resampler_part))
    quoted |= {f"{v}x" for v in re.findall(r"(\d+(?:\.\d+)?)x\b", resampler_part)}
    assert len(quoted) > 10
    invented = sorted(quoted - committed)
    assert not invented, f"numbers not in {RESAMPLING_RESULTS.name}: {invented}"
    total = re.search(r"committed run took (\d+) s", resampler_part).group(1)
    assert f"total {total} s" in results


def test_nuts_numbers_come_from_the_committed_results():
    nuts_part = section(readme_text(), "Headline numbers").split("### NUTS end to end")[1]
    results = SCALING_RESULTS.read_text(encoding="utf-8")
    quoted = set(re.findall(r"[+-]?\d+\.\d+", nuts_part))
    assert len(quoted) > 10
    # A later rerun of some rows states its own exact-likelihood time in its header line.
    rerun_times = set(re.findall(r"exact likelihood took (\d+\.\d+) s in that run", results))
    invented = sorted(quoted - table_cells(results) - rerun_times)
    assert not invented, f"numbers not in {SCALING_RESULTS.name}: {invented}"
    total = re.search(r"committed run took (\d+) s", nuts_part).group(1)
    assert f"total {total} s" in results


def test_lgssm_numbers_come_from_the_committed_results():
    part = section(readme_text(), "LGSSM benchmark (paper protocol, App. I)")
    results = LGSSM_RESULTS.read_text(encoding="utf-8")
    rows = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 5
    committed = {}  # method -> cells of its rows in every table of the file
    for line in results.splitlines():
        if line.startswith("| "):
            committed.setdefault(line.split("|")[1].strip(), set()).update(table_cells(line))
    for row in rows[1:]:
        method = row.split("|")[1].strip()
        assert method in committed, method
        invented = sorted(table_cells(row) - committed[method])
        assert not invented, f"{method}: numbers not in {LGSSM_RESULTS.name}: {invented}"
    prose = part.split("\n|")[0] + part.rsplit("|\n", 1)[-1]
    # The prose may also quote the 100-dataset run of the same protocol.
    both = results + LGSSM_100_RESULTS.read_text(encoding="utf-8")
    quoted = set(re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?", prose))
    assert quoted, "expected numbers in the prose"
    missing = sorted(value for value in quoted if value not in both)
    assert not missing, (
        f"numbers in neither {LGSSM_RESULTS.name} nor {LGSSM_100_RESULTS.name}: {missing}"
    )
    total = re.search(r"committed run took\s+(\d+) s", part).group(1)
    assert f"total {total} s" in results


def test_sampler_numbers_come_from_the_which_method_results():
    results = (ROOT / "benchmarks" / "results" / "which_method.md").read_text(encoding="utf-8")
    committed = set(re.findall(r"\d+(?:\.\d+)?", results))
    readme = readme_text()
    paragraph = readme[readme.index("**Exact posteriors") : readme.index("## Set up")]
    page = (ROOT / "docs" / "which-sampler.md").read_text(encoding="utf-8")
    summary = page[page.index("## What the numbers say") :]
    for text in (paragraph, summary):
        quoted = set(re.findall(r"(\d+(?:\.\d+)?) s\b", text))
        quoted |= set(re.findall(r"R-hat (\d+\.\d+)", text))
        quoted |= set(re.findall(r"(\d+\.\d+) reference SD", text))
        assert quoted, text[:80]
        invented = sorted(quoted - committed)
        assert not invented, f"numbers not in which_method.md: {invented}"
