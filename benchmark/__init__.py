"""Benchmarks and experiments, run from the repository root as modules: ``python -m benchmark.engine.bench_gpu ...``."""
