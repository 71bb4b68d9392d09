"""The product measured against its anchors: run `python -m benchmarks` from the
repository root (see benchmarks/__main__.py; results in benchmarks/RESULTS.md)."""
