"""Benchmarks: pytest-benchmark files (`python -m pytest bench`) and the optimizer-step report
(`python -m bench.report --json out.json`). Not part of the test suite."""
