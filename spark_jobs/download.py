"""Download, check and resize the images of (url, text) pairs into img2dataset-compatible
webdataset shards: `{shard:05d}.tar` (KEY.jpg, KEY.txt, KEY.json), `{shard:05d}.parquet` (metadata
of EVERY input row: status, error_message, sizes, sha256, ...), `{shard:05d}_stats.json`, and
`{shard:05d}_complete.json`, written last. `<images>/_stats/stats.json` sums the written metadata.

Input: any parquet with `url` and `text` (the dedup output); `uid` is computed when absent.
Rows are sorted by uid (or a hash of url and text) and shard = rank // shard_size, so reruns assign the same rows to the same
shards; a rerun skips every shard whose completion marker exists (`<images>/_stats/plan.json`
refuses a rerun over a different input).

Retry: `--retry-failed <previous images> --output <new images>` re-attempts only rows whose
earlier failure was retryable (timeouts, 429/5xx, truncated bodies). The new output has the same
shards and keys: earlier successes are copied from the previous tars, other failures carried over
unchanged, and the retried rows get their new outcome, so <new>/*.parquet is the merged metadata.

Safety: hosts are resolved and private/loopback/link-local/multicast/reserved addresses refused on
every redirect hop (allow networks with --set download.allowed_cidrs=...); X-Robots-Tag opt-outs
are honoured from the headers before any body byte is read.

Consent (udfs/download/download_worker.py): page-level opt-outs (`page_opt_out`), opt-out lists,
robots.txt and tdmrep.json are checked before an image URL is requested; every `opted_out` row
names its `opt_out_source`, counted in the stats (`opt_out_by_source`).
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/download.py`: make the repo importable
    import os  # noqa: E401
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

from spark_jobs import cli, columns, datasets, faults, session  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.schemas import DOWNLOAD_INPUT, IMAGES_METADATA  # noqa: E402
from udfs import fsio  # noqa: E402
from udfs.download import settings as download_settings  # noqa: E402
from udfs.download.block_list import block_store_beside  # noqa: E402
from udfs.download.download_worker import key_digits  # noqa: E402
from udfs.download.plan import summed_shard_stats, summed_status_counts  # noqa: E402

NAME = "download"
HELP = "fetch, check and resize images into webdataset shards (img2dataset-compatible)"
PLAN_FILE = "plan.json"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="parquet dataset with url and text columns (e.g. the dedup output)")
    parser.add_argument("--output", required=True, help="output folder (local path or s3://) for the shards")
    parser.add_argument("--retry-failed", metavar="PREVIOUS",
                        help="a previous download output: re-attempt its retryable failures into --output")


def validate_section(section: dict, storage_options: dict | None = None) -> None:
    """Turn bad download.* values into ConfigError before any task starts."""
    try:
        download_settings.check_section(section, storage_options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def metadata_glob(output: str) -> str:
    return fsio.join(output, "*.parquet")


def metadata_paths(output: str, storage_options: dict | None) -> list[str]:
    """The shard metadata files of a download output, spelled for Spark (see datasets.spark_paths)."""
    return datasets.spark_paths(metadata_glob(output), storage_options)


def completed_shards(output: str, storage_options: dict | None) -> set[int]:
    from udfs.download.download_worker import MARKER_SUFFIX, shard_of

    shards = (shard_of(uri, MARKER_SUFFIX)
              for uri in fsio.expand([fsio.join(output, "*" + MARKER_SUFFIX)], storage_options))
    return {s for s in shards if s is not None}


def check_plan(output: str, plan: dict, storage_options: dict | None) -> None:
    """A rerun must see the same input and shard size, or the 'skip complete shards' rule would
    silently mix two different inputs in one output."""
    path = datasets.stats_path(output, PLAN_FILE)
    if fsio.exists(path, storage_options):
        old = fsio.read_json(path, storage_options)
        if any(old.get(k) != plan[k] for k in plan):
            raise datasets.InputError(
                f"{output} was started for a different input or shard size ({json.dumps(old, sort_keys=True)}); "
                f"now {json.dumps(plan, sort_keys=True)}. Use a new --output, or delete the old one.")
    else:
        fsio.write_json(path, plan, storage_options)


def _shard_task(section: dict, output: str, storage_options: dict | None, digits: int,
                retry_from: str | None, fault: dict | None = None):
    """The per-shard function: (shard, its rows) -> the shard's stats as JSON. It runs as a plain
    (pickled-row) Python UDF over one row per shard, so the driver never imports pandas or pyarrow
    (every Arrow UDF does, ~85 MB; see session.lighten_numpy_converters)."""

    def run_shard(shard, items):
        from udfs.download.download_worker import ShardJob, shard_name
        from udfs.download.plan import job_rows

        shard = int(shard)
        rows = job_rows(shard, items, digits, retry=retry_from is not None)
        previous_tar = fsio.join(retry_from, shard_name(shard) + ".tar") if retry_from else None
        stats = ShardJob(section, output, storage_options).run(shard, rows, previous_tar)
        # Resilience tests: the task dies after its files are written; Spark's retry rewrites them.
        faults.maybe_fail(fault, NAME)
        return json.dumps(stats)

    return run_shard


def _plan_fresh(spark, args, section, storage_options, done: set[int]):
    from pyspark.sql import functions as F

    if not args.input:
        raise datasets.InputError("--input is required (or --retry-failed PREVIOUS)")
    df = datasets.read_dataset(spark, args.input, DOWNLOAD_INPUT)
    for col in ("uid", "page_url", "page_opt_out"):
        if col not in df.columns:
            # SQL rather than F.lit: in PySpark 4, lit (also inside lpad etc.) imports pandas and
            # pyarrow into the driver, ~85 MB (see session.lighten_numpy_converters)
            df = df.withColumn(col, F.expr("NULL").cast("string"))
    df = df.select(*[F.col(c).cast("string") for c in ("uid", "url", "text", "page_url", "page_opt_out")])
    size = section["shard_size"]
    keyed = columns.with_shard_order(df)
    counts = columns.bucket_counts(keyed)
    total = sum(n for _, n in counts)
    plan = {"mode": "fresh", "input": args.input, "rows": total, "shard_size": size}
    check_plan(args.output, plan, storage_options)
    num_shards = math.ceil(total / size) if total else 0
    # enough buckets for every shuffle partition of the ranking window to get some
    rows = columns.ranked_into_shards(keyed, counts, size, 4 * session.shuffle_partitions(spark))
    rows = rows.where(columns.not_in_shards(done))
    return rows, num_shards, total


def _plan_retry(spark, args, section, storage_options, done: set[int]):
    from pyspark.sql import functions as F

    prev = args.retry_failed
    if fsio.normalize_uri(prev).rstrip("/") == fsio.normalize_uri(args.output).rstrip("/"):
        raise datasets.InputError("--retry-failed needs a new --output (the previous shards are read while writing)")
    paths = metadata_paths(prev, storage_options)
    if not paths:
        raise datasets.InputError(f"no download metadata (*.parquet) found in {prev}")
    df = spark.read.parquet(*paths)
    datasets.check_schema(df, IMAGES_METADATA, prev)
    df = datasets.conform(df, IMAGES_METADATA)
    agg = df.agg(F.count("*").alias("n"), F.max("shard").alias("m"),
                 F.sum(((F.col("status") != "success") & F.col("retryable")).cast("long")).alias("r")).first()
    total, shards, retry = int(agg["n"]), (int(agg["m"]) + 1 if agg["m"] is not None else 0), int(agg["r"] or 0)
    log.info("retry-failed: %d of %d previous rows are retryable failures", retry, total)
    plan = {"mode": "retry", "input": prev, "rows": total, "shard_size": section["shard_size"]}
    check_plan(args.output, plan, storage_options)
    rows = df.select("shard", F.struct(*df.columns).alias("row")).where(columns.not_in_shards(done))
    return rows, shards, total


def run(spark, cfg, args) -> dict:
    timer = datasets.StageTimer()
    section = cfg.section("download")
    storage_options = cfg.get("storage.storage_options") or None
    validate_section(section, storage_options)
    output = args.output
    # items taken down (clipcrawl takedown) are never fetched or written again
    section["block_store"] = cfg.get("takedown.block_store") or block_store_beside(output)
    size = section["shard_size"]
    digits = key_digits(size)
    with timer.phase("plan"):
        done = completed_shards(output, storage_options)
        plan = _plan_retry if args.retry_failed else _plan_fresh
        rows, num_shards, total = plan(spark, args, section, storage_options, done)
        todo = num_shards - len(done & set(range(num_shards)))
        log.info("download: %d rows in %d shards of %d; %d shards already complete, %d to do",
                 total, num_shards, size, num_shards - todo, todo)
    shard_stats: list[dict] = []
    if todo:
        with timer.phase("download"):
            from pyspark.sql import functions as F

            task = F.udf(_shard_task(section, output, storage_options, digits, args.retry_failed,
                                     faults.fault_spec(cfg)), "string", useArrow=False).asNondeterministic()
            # One partition per shard, partition i = shard i (as the RDD's partitionBy did): a task
            # downloads exactly one shard, and a retried task redoes that shard alone.
            per_shard = (rows.repartitionById(num_shards, "shard")
                         .groupBy("shard").agg(F.collect_list("row").alias("rows")))
            results = per_shard.select(task("shard", "rows").alias("stats")).collect()
            shard_stats = [json.loads(r["stats"]) for r in results]
    with timer.phase("stats"):
        stats = summarize(spark, output, total, num_shards, storage_options,
                          shard_stats if len(shard_stats) == num_shards else None)
    stats.update(shards_skipped=num_shards - todo, shards_written=len(shard_stats),
                 mode="retry" if args.retry_failed else "fresh",
                 retry_from=args.retry_failed, input=args.input, **timer.summary())
    datasets.write_stats(output, NAME, stats, storage_options=storage_options)
    return stats


def summarize(spark, output: str, total: int, num_shards: int, storage_options: dict | None,
              written_now: list[dict] | None = None) -> dict:
    """Counts of the written shard metadata, plus the time breakdown summed over the per-shard stats
    files (the same sum whatever ran the shards). When this run wrote every shard, the counts are
    those its shard tasks returned, counted from the rows each wrote to its parquet: no Spark job
    (on a fresh command it would be a cold one, ~0.7 s). When shards were skipped (a resume), every
    shard's metadata is read back and counted in Spark."""
    from pyspark.sql import functions as F

    counts: dict[str, int] = {}
    opt_out_by_source: dict[str, int] = {}
    retryable = 0
    paths = metadata_paths(output, storage_options) if num_shards and written_now is None else []
    if written_now:
        counts, opt_out_by_source, retryable = summed_status_counts(written_now)
    if paths:
        df = spark.read.parquet(*paths)
        for r in df.groupBy("status").agg(F.count("*").alias("n"),
                                          F.sum(F.col("retryable").cast("long")).alias("r")).collect():
            counts[str(r["status"])] = int(r["n"])
            retryable += int(r["r"] or 0)
        if counts.get("opted_out") and "opt_out_source" in df.columns:
            for r in df.filter(F.col("status") == "opted_out").groupBy("opt_out_source").count().collect():
                opt_out_by_source[str(r["opt_out_source"])] = int(r["count"])
    written = sum(counts.values())
    ok = counts.get("success", 0)
    seconds, consent = summed_shard_stats(output, storage_options)
    rate = ok / written if written else 0.0
    failures = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if k != "success")
    log.warning("download: %d of %d rows succeeded (success rate %.1f%%); %s; %d failures are retryable "
                "(clipcrawl download --retry-failed %s --output <new>)", ok, written, 100 * rate,
                failures or "no failures", retryable, output)
    if written != total:
        log.warning("download: metadata holds %d rows but the input had %d", written, total)
    return {"input_rows": total, "output_rows": ok, "metadata_rows": written, "success_rate": round(rate, 4),
            "status_counts": counts, "retryable_failures": retryable, "shards": num_shards,
            "worker_seconds": seconds, "opt_out_by_source": opt_out_by_source, "consent": consent}


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
