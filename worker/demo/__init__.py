"""Builders of the tiny real models that the demo, the tests and the benchmarks serve."""
