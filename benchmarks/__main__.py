"""The runner: `python -m benchmarks NAME [--quick] [args...]` runs one benchmark's `main`.

`python -m benchmarks --list` names them; `python -m benchmarks --all [--quick]` runs each in
its own process (some switch JAX's float64 mode on at import), one after another.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_SCRIPTS = {"__init__", "__main__", "_common", "models"}


def scripts() -> dict[str, str]:
    """Benchmark name -> first line of its docstring (read, not imported)."""
    found = {}
    modules = [(path.stem, path) for path in HERE.glob("*.py")]
    packages = [(path.parent.name, path) for path in HERE.glob("*/__init__.py")]
    for name, path in sorted(modules + packages):
        if name in NOT_SCRIPTS or name.startswith("_"):  # helpers, not scripts
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found[name] = doc.splitlines()[0] if doc else ""
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = scripts()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        for name, line in names.items():
            print(f"{name:20s} {line}")
        return 0
    if argv[0] == "--all":
        for name in names:
            print(f"== {name}", flush=True)
            command = [sys.executable, "-m", "benchmarks", name, *argv[1:]]
            completed = subprocess.run(command, cwd=HERE.parent, check=False)
            if completed.returncode:
                return completed.returncode
        return 0
    name, args = argv[0], argv[1:]
    if name not in names:
        sys.exit(f"no benchmark {name!r}; `python -m benchmarks --list` names them")
    importlib.import_module(f"benchmarks.{name}").main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
