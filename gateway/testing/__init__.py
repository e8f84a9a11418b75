"""Harnesses that tests and benchmarks import: a real gateway on a free port, the CLI under test."""
