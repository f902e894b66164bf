"""Benchmarks that ship with msc (`msc bench ...`): they print tables and write JSON results."""
