"""Benchmarks: speed and accuracy measured side by side in one run (results in bench/RESULTS.md)."""
