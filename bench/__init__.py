"""Benchmarks (``pytest bench/``) and their report (``python -m bench.report``); not part of the package."""
