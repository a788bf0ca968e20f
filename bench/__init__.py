"""Benchmark suites (pytest-benchmark) and the report: `pytest bench` then `python -m bench.report`."""
