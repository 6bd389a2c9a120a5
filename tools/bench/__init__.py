"""Benchmarks, each runnable as ``python -m haina.tools.bench.NAME``: dedup, layouts, loss, speed."""
