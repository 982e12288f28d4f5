"""Step 2 of an export: each row's output shard without a global sort. Rows are cut into buckets
of the sort key whose counts the driver knows; a row goes to every shard its bucket overlaps, and
that shard's task ranks the rows of those buckets (all of them, so the ranks are exact)."""

from __future__ import annotations

import math


def bucket_rows(shard_size: int, rank_bucket_rows: int) -> int:
    """Rows per bucket: at most an eighth of a shard, so about one row in eight lies in a bucket that
    straddles two shards (and is sent to both); at most export.rank_bucket_rows (one task sorts it)."""
    return max(1, min(rank_bucket_rows, shard_size // 8))


def bucket_bits(rows: int | None, target: int) -> int:
    """Top bits of the hash that make buckets of about `target` rows (at most 2^20 buckets)."""
    if not rows or rows <= target:
        return 0
    return min(20, math.ceil(math.log2(rows / target)))


def bucket_offsets(counts: list[tuple[tuple, int]]) -> dict[tuple, tuple[int, int, int]]:
    """{bucket key: (bucket number, first position, rows)} for the buckets in sort order; `counts`:
    (bucket key, selected rows). Positions are dense: a bucket starts where the one before it ends."""
    out, start = {}, 0
    for number, (key, rows) in enumerate(sorted(c for c in counts if c[1])):
        out[key] = (number, start, rows)
        start += rows
    return out


def place(table, bucket_cols: list[str], buckets: dict[tuple, tuple[int, int, int]], shard_size: int):
    """Each row once per shard its bucket's positions overlap (`shard`; a bucket smaller than a
    shard overlaps one or two), with `_bidx` (the bucket's number) and `_offset` (its first
    position). Every selected row is placed, with its image or not: the counts that give the
    positions are taken before any tar is read."""
    import numpy as np
    import pyarrow as pa

    n = table.num_rows
    if len(bucket_cols) == 1 and buckets and all(isinstance(k[0], int) for k in buckets):
        # one integer bucket column (the shuffled order): a sorted search instead of a lookup per row
        known = np.array(sorted(k[0] for k in buckets), dtype=np.int64)
        table_info = np.array([buckets[(k,)] for k in known.tolist()], dtype=np.int64)
        values = table.column(bucket_cols[0]).fill_null(-1).to_numpy()
        at = np.minimum(np.searchsorted(known, values), known.size - 1)
        ok = known[at] == values
        if not ok.all():
            raise ValueError(f"bucket {values[~ok][0]} is not in the export plan (the subset changed during the export)")
        info = table_info[at].reshape(n, 3)
    else:
        info = np.zeros((n, 3), dtype=np.int64)
        for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in bucket_cols))):
            got = buckets.get(key)
            if got is None:
                raise ValueError(f"bucket {key} is not in the export plan (the subset changed during the export)")
            info[i] = got
    first = info[:, 1] // shard_size
    repeat = (info[:, 1] + info[:, 2] - 1) // shard_size - first + 1
    take = np.repeat(np.arange(n), repeat)
    step = np.arange(take.size) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    out = table.take(pa.array(take))
    return (out.append_column("shard", pa.array((first[take] + step).astype(np.int32)))
            .append_column("_bidx", pa.array(info[take, 0]))
            .append_column("_offset", pa.array(info[take, 1])))


def shard_rows(table, shard: int, shard_size: int, within: list[str]):
    """The rows of `shard` among the placed rows sent to it, with `position`: the rows come sorted
    by bucket and the bucket's sort columns, each one's position is its bucket's first position plus
    its rank in the bucket (every row of each bucket is here, so the ranks are exact)."""
    import numpy as np
    import pyarrow as pa

    table = table.sort_by([("_bidx", "ascending"), *((c, "ascending") for c in within)])
    bidx = table.column("_bidx").to_numpy()
    n = bidx.size
    new = np.ones(n, dtype=bool)
    new[1:] = bidx[1:] != bidx[:-1]
    starts = np.flatnonzero(new)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    position = table.column("_offset").to_numpy() + rank
    keep = position // shard_size == shard
    return table.filter(pa.array(keep)).append_column("position", pa.array(position[keep], pa.int64()))
