"""Benchmarks, each runnable as ``python -m haina.tools.bench.NAME``: dedup, imports, layouts, logprobs, loss,
memory_paths, meta_build, plan_check, quality, rl, speed, cluster."""
