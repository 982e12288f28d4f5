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
    (bucket key, found rows). Positions are dense: a bucket starts where the one before it ends."""
    out, start = {}, 0
    for number, (key, rows) in enumerate(sorted(c for c in counts if c[1])):
        out[key] = (number, start, rows)
        start += rows
    return out


def place(table, bucket_cols: list[str], buckets: dict[tuple, tuple[int, int, int]], shard_size: int):
    """Each located row once per shard its bucket's positions overlap (`shard`; a bucket smaller
    than a shard overlaps one or two), with `_bidx` (the bucket's number) and `_offset` (its first
    position); a row without its image once, with shard null."""
    import numpy as np
    import pyarrow as pa

    n = table.num_rows
    found = table.column("offset").is_valid().to_numpy(zero_copy_only=False)
    info = np.full((n, 3), -1, dtype=np.int64)
    if len(bucket_cols) == 1 and buckets and all(isinstance(k[0], int) for k in buckets):
        # one integer bucket column (the shuffled order): a sorted search instead of a lookup per row
        known = np.array(sorted(k[0] for k in buckets), dtype=np.int64)
        table_info = np.array([buckets[(k,)] for k in known.tolist()], dtype=np.int64)
        values = table.column(bucket_cols[0]).fill_null(-1).to_numpy()
        at = np.minimum(np.searchsorted(known, values), known.size - 1)
        ok = known[at] == values
        if (found & ~ok).any():
            raise ValueError(f"bucket {values[found & ~ok][0]} is not in the export plan "
                             f"(the subset changed during the export)")
        info[found] = table_info[at[found]]
    else:
        for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in bucket_cols))):
            if found[i]:
                got = buckets.get(key)
                if got is None:
                    raise ValueError(f"bucket {key} is not in the export plan (the subset changed during the export)")
                info[i] = got
    first = np.where(found, info[:, 1] // shard_size, 0)
    last = np.where(found, (info[:, 1] + info[:, 2] - 1) // shard_size, 0)
    repeat = last - first + 1
    take = np.repeat(np.arange(n), repeat)
    step = np.arange(take.size) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    shard = pa.array((first[take] + step).astype(np.int32), mask=~found[take])
    out = table.take(pa.array(take))
    return (out.append_column("shard", shard)
            .append_column("_bidx", pa.array(info[take, 0], mask=~found[take]))
            .append_column("_offset", pa.array(info[take, 1], mask=~found[take])))


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


def place_batches(batches, bucket_cols: list[str], buckets: dict, shard_size: int):
    """place() over a stream of Arrow record batches (job 2's mapInArrow)."""
    import pyarrow as pa

    for batch in batches:
        yield from place(pa.Table.from_batches([batch]), bucket_cols, buckets, shard_size).to_batches()
