"""Benchmarks: figures measured side by side in one run, printed and written as JSON."""
