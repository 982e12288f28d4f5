"""Pure, Spark-free functions the stages run on workers: parsing, hashing, fetching, scoring.

Nothing here imports pyspark, so every function is unit-testable without a JVM.
"""
