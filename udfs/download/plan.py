"""The download plan seen from one shard task: the rows of a shard job, and the per-shard stats
files summed for the stage's stats. Pure Python: the stage ranks rows into shards in Spark.
"""

from __future__ import annotations

from udfs import fsio
from udfs.download.download_worker import make_key
from udfs.ids import pair_uid


def job_rows(shard: int, items, digits: int, retry: bool) -> list[dict]:
    """The rows of one shard job, in key order. Fresh: (uid, url, text, page_url, page_opt_out,
    position) items -> rows with their key (and their uid when the input had none). Retry: a
    previous metadata row (a Spark Row) each -> fetched again when it is a retryable failure, else
    carried."""
    rows = []
    if not retry:
        for item in sorted(items, key=lambda r: r["position"]):   # rank order: uid order
            row = {k: item[k] for k in ("uid", "url", "text", "page_url", "page_opt_out")}
            row["key"] = make_key(shard, item["position"], digits)
            if not row.get("uid"):
                row["uid"] = pair_uid(row.get("url") or "", row.get("text") or "")
            rows.append(row)
        return rows
    for item in sorted(items, key=lambda r: r["key"]):
        prev = item.asDict()
        fetch = prev.get("status") != "success" and bool(prev.get("retryable"))
        row = {k: prev.get(k) for k in ("key", "uid", "url", "text", "page_url")}
        row.update(action="fetch" if fetch else "carry", previous=prev)
        rows.append(row)
    return rows


def summed_shard_stats(output: str, storage_options: dict | None) -> tuple[dict[str, float], dict[str, int]]:
    """(worker seconds by phase, consent fetches by kind) summed over the `*_stats.json` files the
    shard jobs wrote: the same sum whatever ran the shards."""
    seconds: dict[str, float] = {}
    consent: dict[str, int] = {}
    for uri in fsio.expand([fsio.join(output, "*_stats.json")], storage_options):
        shard_stats = fsio.read_json(uri, storage_options)
        for k, v in (shard_stats.get("seconds") or {}).items():
            seconds[k] = round(seconds.get(k, 0.0) + float(v), 3)
        for k, v in (shard_stats.get("consent") or {}).items():   # robots.txt / tdmrep.json fetches
            consent[k] = consent.get(k, 0) + int(v)
    return seconds, consent


def summed_status_counts(shard_stats: list[dict]) -> tuple[dict[str, int], dict[str, int], int]:
    """(rows by status, opted-out rows by source, retryable failures) summed over the stats the
    shard jobs returned, each counted from the rows that job wrote to its metadata parquet."""
    counts: dict[str, int] = {}
    by_source: dict[str, int] = {}
    retryable = 0
    for shard in shard_stats:
        for status, n in shard["status_dict"].items():
            counts[status] = counts.get(status, 0) + int(n)
        for source, n in (shard.get("opt_out_sources") or {}).items():
            by_source[source] = by_source.get(source, 0) + int(n)
        retryable += int(shard["retryable_failures"])
    return counts, by_source, retryable
