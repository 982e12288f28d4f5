"""Deduplicate image/alt-text pairs: exact dedup within the run, then a sharded Bloom-filter
join against the pairs of earlier runs, and a failed-URL filter.

    clipcrawl dedup --input <wat_pairs> --output <pairs_dedup> [--seen URI] [--failed-seen URI]
    clipcrawl dedup --add-failed <images dir> --failed-seen URI      # feed the failed-URL filter

1. Key: normalised url + text (udfs/dedup/dedup_keys.py), hashed in the JVM into a 128-bit digest of two
   xxhash64 (hash scheme 2; a filter built with SHA-256, scheme 1, is still probed with SHA-256:
   the scheme is read from the filter's manifest, see udfs/dedup/bloom.py for why 128 bits suffice).
2. Exact dedup: of the rows sharing a key, the one with the earliest record_date is kept (ties:
   smallest uid, then source_file, record_id, page_url); the others go to <output>_rejected as
   `duplicate` with the kept uid in error_message. The rule is deterministic, so reruns agree.
3. Failed-URL filter (--failed-seen): a kept row whose normalised URL is in that filter is
   rejected as `failed_before`. `--add-failed` adds the URLs of `<images>/*.parquet` rows with
   status != success and retryable = false (the download stage's metadata).
4. Seen filter (--seen): rows are repartitioned by the key's shard (hash prefix), each task loads
   only its shard of generation N, drops keys it probably holds (`seen_before`) and writes its
   shard, with the surviving keys added, into generation N+1. The driver publishes N+1 (moves
   the CURRENT pointer) only after the output and rejected rows are written; stats come last,
   counted from the parquet footers of the two written datasets.

A run that dies before the publish leaves generation N current: the rerun reads N and writes the
same output. A run that dies after the publish but before its stats: the rerun sees that CURRENT
was written by a run with the same input and output, reads that generation's parent instead,
and again writes the same output. A missing or damaged filter stops the run with a clear error,
or, with dedup.on_corrupt_filter=fresh_start, starts an empty filter (pairs seen before are then
kept again; no row is lost).
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/dedup.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import logging
import sys

from spark_jobs import cli, columns, datasets, session
from spark_jobs.config import Config, ConfigError
from spark_jobs.schemas import DEDUP_REJECTED, WAT_PAIRS
from udfs import fsio
from udfs.dedup import filter_state
from udfs.dedup.bloom import HASH_SCHEME_XXH64_PAIR
from udfs.dedup.filter_state import FilterState

NAME = "dedup"
HELP = "exact dedup of url+text, then drop pairs seen in earlier runs (sharded Bloom filter)"

log = logging.getLogger(__name__)

DUPLICATE, SEEN_BEFORE, FAILED_BEFORE = "duplicate", "seen_before", "failed_before"
PAIR_KEYS, URL_KEYS = "pair", "url"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="wat_pairs dataset (path or URI)")
    parser.add_argument("--output", help="deduplicated pairs (same schema and partitioning)")
    parser.add_argument("--rejected-output", help="rejected rows (default: <output>_rejected)")
    parser.add_argument("--seen", metavar="URI",
                        help="seen-pairs filter store, read and advanced by one generation "
                             "(default: dedup.seen; none: no cross-run dedup)")
    parser.add_argument("--failed-seen", metavar="URI",
                        help="failed-URL filter store (default: dedup.failed_seen)")
    parser.add_argument("--add-failed", metavar="IMAGES_DIR",
                        help="first add the non-retryable failures of a download output "
                             "(<IMAGES_DIR>/*.parquet) to the failed-URL filter")


def _translate_task_error(exc: Exception) -> None:
    """A shard that fails its checksum inside a task surfaces as a Spark error: make it an InputError."""
    message = str(exc)
    if "CorruptFilterError" in message:
        detail = next((line for line in message.splitlines() if "CorruptFilterError" in line), message)
        raise datasets.InputError(f"a filter shard is damaged: {detail.strip()[:500]}. Restore the "
                                  "filter or set dedup.on_corrupt_filter=fresh_start") from exc


def open_filter(role: str, uri: str, key_kind: str, conf: dict, storage_options: dict, shards: int,
                expected_keys: int, writable: bool, resume_run: dict | None = None) -> FilterState:
    """filter_state.open_filter, with a bad setting as ConfigError and damage as InputError."""
    mode = conf.get("on_corrupt_filter", "error")
    if mode not in ("error", "fresh_start"):
        raise ConfigError(f"dedup.on_corrupt_filter must be error or fresh_start, got {mode!r}")
    try:
        return filter_state.open_filter(role, uri, key_kind, conf, storage_options, shards, expected_keys,
                                        writable, resume_run, is_complete=datasets.is_complete)
    except filter_state.FilterUnusable as exc:
        raise datasets.InputError(str(exc)) from exc.__cause__


def add_failed(spark, conf: dict, storage_options: dict, images: str, failed_uri: str) -> dict:
    """Add the URLs of non-retryable download failures to the failed-URL filter (one generation)."""
    from pyspark.sql import functions as F

    pattern = fsio.join(images, "*.parquet")
    files = datasets.spark_paths(pattern, storage_options)
    if not files:
        raise datasets.InputError(f"no download metadata found at {pattern}")
    try:
        meta = spark.read.parquet(*files)
    except Exception as exc:  # noqa: BLE001 - AnalysisException
        raise datasets.InputError(f"cannot read download metadata {pattern}: "
                                  f"{str(exc).splitlines()[0]}") from exc
    missing = [c for c in ("url", "status", "retryable") if c not in meta.columns]
    if missing:
        raise datasets.InputError(f"download metadata at {pattern} lacks columns {missing}")
    failed = meta.filter((F.col("status") != "success") & (F.col("retryable") == F.lit(False))
                         & F.col("url").isNotNull())
    state = open_filter("failed-URL", failed_uri, URL_KEYS, conf, storage_options,
                        int(conf["failed_shards"]), int(conf["failed_expected_keys"]), writable=True)
    try:
        with session.arrow_batches_by_rows(spark):
            per_shard = columns.add_url_keys(spark, failed, state.plan)
    except Exception as exc:  # noqa: BLE001
        _translate_task_error(exc)
        raise
    state.publish(float(conf["false_positive_rate"]), int(conf["failed_expected_keys"]), {"add_failed": images})
    return {"images": images, "failed_urls": sum(r["keys_in"] for r in per_shard),
            "failed_urls_new": sum(r["keys_new"] for r in per_shard), "filter": state.stats()}


def run(spark, cfg: Config, args: argparse.Namespace) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    conf = cfg.section("dedup")
    storage_options = cfg.get("storage.storage_options") or {}
    seen_uri = args.seen or conf.get("seen")
    failed_uri = args.failed_seen or conf.get("failed_seen")
    timer = datasets.StageTimer()
    result: dict = {}

    if args.add_failed:
        if not failed_uri:
            raise ConfigError("--add-failed needs a failed-URL filter: --failed-seen URI or dedup.failed_seen")
        with timer.phase("add_failed"):
            result["add_failed"] = add_failed(spark, conf, storage_options, args.add_failed, failed_uri)
        if not args.input:
            result.update(timer.summary())
            datasets.write_stats(failed_uri, NAME + "-add-failed", result, storage_options=storage_options)
            return result
    if not args.input or not args.output:
        raise ConfigError("dedup needs --input and --output (or only --add-failed with --failed-seen)")

    output = args.output
    rejected = datasets.rejected_path(output, args.rejected_output)
    shards = int(conf["shards"])
    expected_keys = int(conf["expected_keys"])
    this_run = {"input": args.input, "output": output}

    failed = None
    if failed_uri:
        failed = open_filter("failed-URL", failed_uri, URL_KEYS, conf, storage_options,
                             int(conf["failed_shards"]), int(conf["failed_expected_keys"]), writable=False)
    seen = None
    if seen_uri:
        seen = open_filter("seen-pairs", seen_uri, PAIR_KEYS, conf, storage_options, shards,
                           expected_keys, writable=True, resume_run=this_run)
        shards = seen.plan.shard_count

    # Exact dedup hashes with the seen filter's scheme (one digest serves the window and the
    # probe); without a seen filter, with the scheme new filters get.
    scheme = seen.plan.hash_scheme if seen is not None else int(conf.get("hash_scheme", HASH_SCHEME_XXH64_PAIR))
    digest_cols = columns.digest_columns("_digest", scheme)
    df = datasets.conform(datasets.read_dataset(spark, args.input, WAT_PAIRS), WAT_PAIRS)
    df = columns.with_key_digest(df, "url", "text", "_digest", "_shard", shards, scheme)

    if failed is not None and failed.read is not None:  # an empty failed-URL filter needs no pass
        df = columns.with_failed_flag(spark, df, failed.plan)
    else:
        df = df.withColumn("_failed", F.lit(False))
    df = columns.ranked_by_key(spark, df, digest_cols, shards)
    if seen is not None:
        df = columns.with_seen_flag(df, seen.plan, digest_cols, (F.col("_rank") == 1) & ~F.col("_failed"))
    else:
        df = df.withColumn("_seen", F.lit(False))

    seen_gen = seen.read.generation if seen and seen.read else None
    failed_gen = failed.read.generation if failed and failed.read else None
    status = (F.when(F.col("_rank") > 1, F.lit(DUPLICATE))
               .when(F.col("_failed"), F.lit(FAILED_BEFORE))
               .when(F.col("_seen"), F.lit(SEEN_BEFORE)))
    message = (F.when(F.col("_rank") > 1, F.concat(F.lit("duplicate of uid "), F.col("_kept_uid")))
                .when(F.col("_failed"), F.lit(f"url probably in the failed-URL filter {failed_uri} "
                                              f"(generation {failed_gen})"))
                .when(F.col("_seen"), F.lit(f"pair probably in the seen filter {seen_uri} "
                                            f"(generation {seen_gen})")))
    # The rows are computed once and kept for the two writes: the seen probe writes filter shards,
    # so they cannot be recomputed for the second write. Kept and rejected rows have different
    # files (columns and partitioning), so one partitioned write cannot give both layouts. A lazy
    # local checkpoint stores the rows as rows during the first write; the DataFrame cache would
    # encode and compress them into columns first, which costs more CPU than it saves
    # (300k rows, task CPU: 26.4 s with persist, 19.5 s with the checkpoint). Only the columns the
    # writes need are kept (not the digests, shard and rank columns). The blocks are released when
    # the DataFrame is garbage-collected (Spark's context cleaner; Spark Connect on release).
    # The price: an executor lost between the two writes takes blocks that a local checkpoint cannot
    # recompute, so the run fails (before the publish: the rerun writes the same output, as above).
    tagged = df.select(*DEDUP_REJECTED.schema.fieldNames()[:-3], status.alias("status"),
                       message.alias("error_message"), "crawl")
    tagged = tagged.localCheckpoint(eager=False, storageLevel=StorageLevel.MEMORY_AND_DISK)
    try:
        with timer.phase("write"), session.arrow_batches_by_rows(spark):   # only keys go to Python
            datasets.write_dataset(tagged.filter(F.col("status").isNull()), output, WAT_PAIRS)
            datasets.write_dataset(tagged.filter(F.col("status").isNotNull()), rejected, DEDUP_REJECTED)
    except Exception as exc:  # noqa: BLE001
        _translate_task_error(exc)
        raise
    finally:
        del tagged

    if seen is not None:
        with timer.phase("publish"):
            seen.publish(float(conf["false_positive_rate"]), expected_keys, this_run)

    with timer.phase("count"):  # from the written files' footers: no Spark job, no scan
        out_counts = datasets.footer_counts(output, "crawl", storage_options)
        rej_counts = datasets.footer_counts(rejected, "status", storage_options)
    output_rows = sum(out_counts.values())
    rejected_rows = sum(rej_counts.values())
    result.update({
        "input": args.input, "output": output, "rejected_output": rejected,
        "input_rows": output_rows + rejected_rows, "output_rows": output_rows,
        "rejected_rows": rejected_rows, "output_rows_by_crawl": out_counts,
        "rejected_by_status": rej_counts,
        "exact_duplicates": rej_counts.get(DUPLICATE, 0),
        "bloom_drops": rej_counts.get(SEEN_BEFORE, 0),
        "failed_url_drops": rej_counts.get(FAILED_BEFORE, 0),
        "seen_filter": seen.stats() if seen else None,
        "failed_filter": failed.stats() if failed else None,
        **timer.summary(),
    })
    datasets.write_stats(output, NAME, result, storage_options=storage_options)
    return result


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
