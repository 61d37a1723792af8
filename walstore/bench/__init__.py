"""Benchmarks run by `walstore bench ...`: each prints its numbers and what they mean."""
