"""The benchmark suite: `python -m benchmarks NAME [--quick] [args...]` (`--list` names them).

Shared parts: `models` (the models, which tests import too), `_common` (the timing protocol
`time_call`, the report writer `write_report`, tables and run metadata). Each script's `main`
writes `results/NAME.json` and the markdown table beside it.
"""
