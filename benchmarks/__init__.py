"""Benchmarks and the numpy reference metrics (importable by the tests as `benchmarks.reference_metrics`)."""
