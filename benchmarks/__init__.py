"""Benchmarks of the fast paths (bench_metrics, bench_speed; docs/benchmarks_fastpaths.md) and a GPU
training check (gpu_check)."""
