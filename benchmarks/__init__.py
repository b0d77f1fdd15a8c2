"""Benchmarks: each compares the project's path with a bare baseline measured in the same run."""
