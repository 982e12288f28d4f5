"""Takedown: take published items out of every file under a pipeline root, safely (no Spark).
Rewrites parquet, tars, embedding parts and kNN indices beside the originals, then swaps them in.
"""
