"""Dedup: the pair key (normalised URL + alt-text) and the sharded Bloom filter of keys seen before.
Key rules, the filter file format and its generations store; no Spark (the JVM twins are in spark_jobs).
"""
