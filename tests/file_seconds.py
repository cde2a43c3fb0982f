"""Write `tests/file_seconds.json` (seconds per test file) from a JUnit report of a full run.

    XLA_FLAGS=... pytest -n 2 --dist loadfile --junitxml=/tmp/run.xml    # e.g. make test's run
    python tests/file_seconds.py /tmp/run.xml

`tests/conftest.py` hands the files to the workers in `longest_first` order by these numbers.
They only order the run: stale numbers make it a little slower, never wrong.
"""

import collections
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUT = Path(__file__).with_name("file_seconds.json")
ROOT = Path(__file__).resolve().parents[1]


def _file_of(classname: str) -> str:
    """`tests.a.test_b` or `tests.a.test_b.TestC` -> `tests/a/test_b.py`."""
    parts = classname.split(".")
    while parts and not (ROOT / ("/".join(parts) + ".py")).is_file():
        parts.pop()
    return "/".join(parts) + ".py"


def file_seconds(junit_xml: Path) -> dict[str, int]:
    """Total seconds of each test file's test cases, by path from the repository root."""
    totals = collections.Counter()
    for case in ET.parse(junit_xml).iter("testcase"):
        totals[_file_of(case.get("classname"))] += float(case.get("time"))
    return {path: round(seconds) for path, seconds in sorted(totals.items())}


def stored() -> dict[str, int]:
    """The committed seconds per file."""
    return json.loads(OUT.read_text())


def longest_first(paths, seconds):
    """`paths` (distinct) ordered for the workers: the ones `seconds` lacks first (they may be
    long), then by descending seconds; ties keep their order."""
    return sorted(paths, key=lambda path: -seconds.get(path, math.inf))


if __name__ == "__main__":
    OUT.write_text(json.dumps(file_seconds(Path(sys.argv[1])), indent=2) + "\n")
