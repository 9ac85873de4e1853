"""Benchmarks against peers; run each as a module from the repo root: python -m bench.NAME."""
