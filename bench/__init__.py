"""Benchmarks, not part of the test suite: the one-shot GPU check (`bash bench/gpu_check.sh`:
correctness on CUDA, then the optimizer-step report, `python -m bench.report` alone), and
pytest-benchmark files (`python -m pytest bench`). See bench/RESULTS.md."""
