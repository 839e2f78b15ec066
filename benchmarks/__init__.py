"""Benchmarks of the fast paths (bench_metrics, bench_speed; docs/benchmarks.md section 4), of the
image check before training (bench_image_check) and a GPU training check (gpu_check)."""
