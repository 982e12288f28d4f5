"""Benchmarks: each figure is a ratio against a peer or a limit, measured side by side in one run."""
