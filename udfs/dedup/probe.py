"""The Bloom probe as it runs in a task: one partition's key batches against one shard at a time.

No Spark objects here: these run in Python workers on Arrow arrays (spark_jobs/columns.py wraps a
probe as a column). A partition holds the rows of one shard (spark_jobs.columns.shard_partitioning),
so a shard is loaded once and, when it gained keys, written once into the next generation.
"""

from __future__ import annotations

from typing import Callable, Iterator

from udfs.dedup.bloom import (
    HASH_SCHEME_SHA256_DOUBLE,
    HASH_SCHEME_XXH64_PAIR,
    digests_from_bytes,
    digests_from_longs,
)
from udfs.dedup.bloom_store import ShardPlan


def _digest_words(arrays, scheme: int = HASH_SCHEME_SHA256_DOUBLE):
    """Digest words (bloom.digests layout) of the Arrow digest column(s) of a batch, without a
    Python loop: (n, 4) from one binary column of 32-byte SHA-256 digests, (n, 2) from two xxhash64
    long columns."""
    import numpy as np
    import pyarrow as pa

    if scheme == HASH_SCHEME_XXH64_PAIR:
        a, b = arrays
        return digests_from_longs(a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False))
    (arr,) = arrays
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    if data.size != 32 * len(arr):
        raise ValueError("digest column does not hold 32-byte values")
    return digests_from_bytes(data)


def _shard_runs(shards) -> Iterator[tuple[int, int, int]]:
    """(shard, start, stop) for runs of equal shard in a batch (a partition holds one shard, so
    normally one run; the cursor refuses a shard that comes back after another)."""
    import numpy as np
    if len(shards) == 0:
        return
    cuts = np.flatnonzero(np.diff(shards)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(shards)]])
    for a, b in zip(starts, stops):
        yield int(shards[a]), int(a), int(b)


class ShardCursor:
    """Walks the shards of one partition in order, loading one shard at a time. A shard that
    shows up again after the cursor moved on is a bug in the plan (see shard_partitioning)."""

    def __init__(self, plan: ShardPlan, writable: bool):
        self.plan, self.writable = plan, writable
        self.shard: int | None = None
        self.old = self.new = None
        self.added = 0
        self.done: set[int] = set()

    def move_to(self, shard: int):
        if shard == self.shard:
            return
        self.finish()
        if shard in self.done:
            raise RuntimeError(f"rows of shard {shard} are not contiguous in the partition")
        self.shard, self.old, self.new, self.added = shard, self.plan.load(shard), None, 0

    def add(self, words):
        if len(words) == 0:
            return
        if self.new is None:
            self.new = self.old.copy()  # test against the old bits only: order-independent result
        self.added += self.new.add_digests(words)

    def finish(self):
        if self.shard is None:
            return
        self.old = None  # free the old bits before the file image is built: peak stays ~2 shards
        if self.writable and self.new is not None and self.added:
            self.plan.write(self.new)
        self.done.add(self.shard)
        self.shard = self.old = self.new = None


def probe_seen(plan: ShardPlan, batches) -> Iterator:
    """The seen-filter probe over key batches only: (shards, digest column(s) of the plan's hash
    scheme, candidate) Arrow arrays in, one bool numpy array (`_seen`) out per batch. Candidates
    (representative, not failed) whose key the shard probably holds are seen; the other candidates
    are added to the shard's new bits, which are written when the partition ends."""
    import numpy as np
    cursor = ShardCursor(plan, writable=True)
    for shard_arr, *digest_arrs, cand_arr in batches:
        n = len(shard_arr)
        seen = np.zeros(n, dtype=bool)
        if n:
            shards = shard_arr.to_numpy(zero_copy_only=False)
            candidate = cand_arr.to_numpy(zero_copy_only=False).astype(bool)
            words = _digest_words(digest_arrs, plan.hash_scheme)
            for shard, a, b in _shard_runs(shards):
                cursor.move_to(shard)
                idx = a + np.flatnonzero(candidate[a:b])
                hit = cursor.old.contains_digests(words[idx])
                seen[idx[hit]] = True
                cursor.add(words[idx[~hit]])
        yield seen
    cursor.finish()


def probe_failed(plan: ShardPlan, batches) -> Iterator:
    """The failed-URL probe over key batches only: (url shards, url digest column(s)) in, `_failed` out."""
    import numpy as np
    cursor = ShardCursor(plan, writable=False)
    for shard_arr, *digest_arrs in batches:
        failed = np.zeros(len(shard_arr), dtype=bool)
        if len(shard_arr):
            shards = shard_arr.to_numpy(zero_copy_only=False)
            words = _digest_words(digest_arrs, plan.hash_scheme)
            for shard, a, b in _shard_runs(shards):
                cursor.move_to(shard)
                failed[a:b] = cursor.old.contains_digests(words[a:b])
        yield failed


def add_keys_fn(plan: ShardPlan, digest_cols: list[str]) -> Callable:
    """mapInArrow function for --add-failed: add every key, write the touched shards, and emit
    one row per shard (shard, keys_in, keys_new)."""
    def fn(batches):
        import pyarrow as pa
        cursor = ShardCursor(plan, writable=True)
        counts: dict[int, list[int]] = {}
        for batch in batches:
            if not batch.num_rows:
                continue
            shards = batch.column("_shard").to_numpy(zero_copy_only=False)
            words = _digest_words([batch.column(c) for c in digest_cols], plan.hash_scheme)
            for shard, a, b in _shard_runs(shards):
                cursor.move_to(shard)
                before = cursor.added
                cursor.add(words[a:b])
                c = counts.setdefault(shard, [0, 0])
                c[0] += b - a
                c[1] += cursor.added - before
        cursor.finish()
        if counts:
            yield pa.RecordBatch.from_pydict({
                "shard": pa.array(list(counts), pa.int32()),
                "keys_in": pa.array([c[0] for c in counts.values()], pa.int64()),
                "keys_new": pa.array([c[1] for c in counts.values()], pa.int64())})
    return fn
