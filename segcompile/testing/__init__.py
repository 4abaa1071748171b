"""Tiny random-init models of every supported family, for the demo, the tests, the benchmarks
and the examples (nothing is downloaded)."""
