"""Training-ready output: one subset as shards that open_clip and Hugging Face `datasets` read as
they are, so a dataset built here trains a model with one more command.

    clipcrawl export --dataset <root>/dataset --subset laion2B-en --output <dir>
        [--where "punsafe < 0.5 AND WIDTH >= 256"] [--limit N] [--shuffle-seed S | --no-shuffle]
        [--format webdataset|parquet]

Writes `{shard:05d}.tar` (or `.parquet`), `sizes.json`, `_info.json`, `manifest/` (every selected row:
its shard, or missing_image and why), `_markers/` (resume) and `_stats/stats.json` last (formats:
udfs/export/). Order: a seeded shuffle across shards, byte-identical for the same inputs and seed.
Two Spark jobs, DataFrame APIs only: (1) the selected rows counted per bucket of the sort key, in
the JVM (no tar is read: these counts give every bucket's first position); (2) each row goes to the
shard(s) its bucket overlaps (udfs/export/order.py): in the JVM when download recorded where its image
lies (image_offset, checked against the member header by the shard task), else one task per source
tar first locates its rows in the tar's headers (udfs/export/locate.py); then one task per shard ranks,
copies and writes it with its marker and manifest part (udfs/export/shards.py); their returns give
sizes.json, _info.json and the stats, checked against job (1)'s counts.

Positions count the selected rows, so a row whose image is missing (not in its tar, or the tar gone
or damaged) keeps its place and leaves a gap: its shard holds one sample fewer than
export.shard_size (and a shard whose rows are all missing is an empty tar, so the brace pattern
still names every file). The missing row is in manifest/ (missing_image and why) and the stats;
sizes.json, _info.json and the open_clip command count the samples written, and the same inputs
and seed give the same bytes. Missing images are rare (filter keeps downloaded rows only), and
counting first saves a pass over every tar before the copy.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/export.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

from spark_jobs import cli, columns, datasets, session  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.datasets import InputError  # noqa: E402
from spark_jobs.schemas import EXPORT_MANIFEST, SUBSET  # noqa: E402
from udfs import fsio  # noqa: E402
from udfs.export import layout, order  # noqa: E402
from udfs.export.locate import locate_group  # noqa: E402
from udfs.export.shards import JSON_COLUMN, RESULT_FIELDS, WEBDATASET_COLUMNS, write_partition  # noqa: E402

NAME = "export"
HELP = "write a subset as shuffled webdataset (or parquet) shards that open_clip and Hugging Face read"
MANIFEST_DIR = "manifest"
FINAL_FILES = ("sizes.json", "_info.json")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True,
                        help="the filter output folder (holding the subsets), a `clipcrawl run` root, "
                             "or one subset folder")
    parser.add_argument("--subset", help="the subset to export (default: filter.subsets.en)")
    parser.add_argument("--output", required=True, help="the export folder (local path or URI)")
    parser.add_argument("--format", choices=layout.FORMATS, help="default: export.format")
    parser.add_argument("--where", help="a SQL predicate over the subset's columns, e.g. "
                                        "\"punsafe < 0.5 AND WIDTH >= 256 AND similarity >= 0.3\"")
    parser.add_argument("--limit", type=int, help="export only the first N selected rows (smoke tests)")
    parser.add_argument("--shuffle-seed", type=int, help="seed of the shuffle (default: export.shuffle_seed)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the subset's order")


def build_settings(cfg, args) -> dict:
    try:
        ints = layout.check_section(cfg.section("export"), args.format, args.limit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return {**ints, "shuffle": not args.no_shuffle,
            "seed": args.shuffle_seed if args.shuffle_seed is not None else ints["shuffle_seed"],
            "storage_options": cfg.get("storage.storage_options") or None}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def select_rows(spark, path: str, where: str | None):
    """The subset's rows passing --where, with their file and row number (the subset's order).

    The predicate is analysed here, on the driver, before any task: a predicate that does not parse,
    names an unknown column or is not boolean is a one-line InputError."""
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F

    df = datasets.read_dataset(spark, path, SUBSET)
    for name in RECORDED:   # a subset from before download recorded them
        if name not in df.columns:
            df = df.withColumn(name, F.expr("CAST(NULL AS BIGINT)"))
    if where:
        quiet = logging.getLogger("SQLQueryContextLogger")   # PySpark logs the analysis error's trace
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            df = df.where(where)
            df.schema   # noqa: B018 - parse and resolve now (Spark Connect analyses lazily)
        except PySparkException as exc:
            raise InputError(f"--where {where!r} is not a predicate over the subset's columns: "
                             f"{_first_line(exc)}") from exc
        finally:
            quiet.setLevel(level)
    try:
        located = df.select("*", F.col("_metadata.file_path").alias("_file"),
                            F.col("_metadata.row_index").alias("_row"))
        located.schema   # noqa: B018
    except PySparkException:   # an empty subset (no parquet files) is a DataFrame without file metadata
        located = df.select("*", F.expr("''").alias("_file"), F.expr("CAST(0 AS BIGINT)").alias("_row"))
    return located.select(*SUBSET.schema.fieldNames(), "_file", "_row")


def row_count_hint(spark, path: str, limit: int | None, storage_options) -> int:
    """The subset's row count (from its parquet footers: no Spark job), an upper bound of the
    selected rows: it sizes the buckets, which only decides how many rows go to two shards."""
    rows = layout.footer_rows(path, storage_options)
    if rows is None:
        rows = datasets.read_dataset(spark, path, SUBSET).count()
    return rows if limit is None else min(rows, limit)


RECORDED = layout.RECORDED_COLUMNS   # where download put each image in its tar
LOCATED_FIELDS = (("ext", "string"), ("offset", "bigint"), ("size", "bigint"), ("error_message", "string"))
PLACED_FIELDS = (("shard", "int"), ("_bidx", "bigint"), ("_offset", "bigint"))


def _with_fields(schema, extra):
    """`schema` with the (name, type) fields of `extra` appended (Spark or Arrow type names)."""
    from pyspark.sql import types as T

    types = {"string": T.StringType(), "bigint": T.LongType(), "int": T.IntegerType(), "int32": T.IntegerType(),
             "int64": T.LongType(), "float64": T.DoubleType()}
    return T.StructType([*schema.fields, *(T.StructField(n, types[t]) for n, t in extra)])


def count_rows(df, bucket_cols: list[str]) -> tuple[list[tuple[tuple, int]], int]:
    """Job 1: ([(bucket key, selected rows)], rows whose image offset download recorded), an
    aggregate in the JVM (no Python, no tar read)."""
    from pyspark.sql import functions as F

    got = df.groupBy(*bucket_cols).agg(F.count(F.lit(1)).alias("n"), F.count(RECORDED[0]).alias("known")).collect()
    return [(tuple(r[c] for c in bucket_cols), int(r["n"])) for r in got], sum(int(r["known"]) for r in got)


def write_shards(spark, df, bucket_cols, within, buckets, num_shards, output, worker_settings,
                 recorded: bool) -> list[dict]:
    """Job 2: rows placed in the shard(s) their bucket overlaps: in the JVM when download recorded
    every image's offset (`recorded`), else by one group per source tar, which first locates its
    rows in the tar's headers. Then each task takes its shards in order: ranks each one's buckets'
    rows, writes the shard and its marker, and its manifest/ part (its missing images included)."""
    from pyspark.sql import types as T

    shard_size, so = worker_settings["shard_size"], worker_settings["storage_options"]
    placed_schema = _with_fields(df.schema, LOCATED_FIELDS + PLACED_FIELDS)
    # explicit repartitions: adaptive execution would fold the small (metadata-only) shuffles into one task
    parts = max(1, min(session.shuffle_partitions(spark), num_shards))
    if recorded:
        placed = columns.place_rows(spark, df, bucket_cols, buckets, shard_size)
    else:
        placed = (df.repartition(session.shuffle_partitions(spark), "tar_path").groupBy("tar_path")
                  .applyInArrow(lambda t: locate_group(t, bucket_cols, buckets, shard_size, so), placed_schema))
    # by shard number, not its hash: partitions get whole shards in equal numbers (a hash left one
    # task with 15 shards and another with 9, and one core idle for the tail)
    return [r.asDict() for r in placed.repartitionById(parts, "shard").sortWithinPartitions("shard")
            .mapInArrow(lambda batches: write_partition(batches, output, MANIFEST_DIR, within, worker_settings),
                        _with_fields(T.StructType([]), RESULT_FIELDS)).collect()]


def run(spark, cfg, args) -> dict:
    timer = datasets.StageTimer()
    settings = build_settings(cfg, args)
    so = settings["storage_options"]
    subset = args.subset or cfg.get("filter.subsets.en")
    subset_path = datasets.resolve_subset(args.dataset, subset, (cfg.get("run.datasets") or {}).get("filter", "dataset"), so)
    output = args.output
    fmt, shard_size = settings["format"], settings["shard_size"]
    with timer.phase("select"):
        selected = select_rows(spark, subset_path, args.where)
        hint = row_count_hint(spark, subset_path, args.limit, so)
        df, bucket_cols, within = columns.export_order(selected, settings, hint)
        if fmt == "webdataset":   # KEY.json written in the JVM, and only what the tasks read goes to Python
            df = df.withColumn(JSON_COLUMN, columns.export_json(df, layout.LAION_COLUMNS))
            df = df.select(*dict.fromkeys([*WEBDATASET_COLUMNS, *bucket_cols, *within]))
        if args.limit is not None:
            df = df.orderBy(*(["_h", "_file", "_row"] if settings["shuffle"] else ["_file", "_row"])).limit(args.limit)
    # An earlier export's final files must not make a partial rerun look complete.
    for name in (datasets.stats_path(output), *(fsio.join(output, f) for f in FINAL_FILES)):
        fsio.remove(name, so)
    manifest_path = fsio.join(output, MANIFEST_DIR)
    fs, out_path = fsio.filesystem(output, so)
    fs.makedirs(out_path, exist_ok=True)
    fsio.remove(manifest_path, so)   # rewritten whole below, resumed or not
    with timer.phase("plan"):
        counts, known = count_rows(df, bucket_cols)
        buckets = order.bucket_offsets(counts)
        selected_rows = sum(rows for _, _, rows in buckets.values())
        recorded = known == selected_rows   # every image's place in its tar known: no header pass
        num_shards = math.ceil(selected_rows / shard_size)
        plan = layout.plan_id({
            "subset": subset_path, "source": layout.source_fingerprint(subset_path, so), "where": args.where,
            "limit": args.limit, "shuffle": settings["shuffle"], "seed": settings["seed"],
            "shard_size": shard_size, "format": fmt, "samples": selected_rows})
    log.info("export: %d selected rows -> %d shards of %d (%s, %s)", selected_rows, num_shards, shard_size, fmt, f"seed {settings['seed']}" if settings["shuffle"] else "subset order")
    worker_settings = {"format": fmt, "plan": plan, "read_chunk": settings["read_chunk"], "storage_options": so,
                       "shard_size": shard_size, "max_listed_missing": settings["max_listed_missing"]}
    with timer.phase("write_shards"), session.arrow_batches_by_rows(spark):   # rows of metadata, no image bytes
        results = write_shards(spark, df, bucket_cols, within, buckets, num_shards, output, worker_settings,
                               recorded=recorded) if selected_rows else []
    with timer.phase("stats"):
        if not selected_rows:   # an empty manifest of the declared schema
            datasets.write_dataset(spark.createDataFrame([], EXPORT_MANIFEST.schema), manifest_path, EXPORT_MANIFEST)
        done = layout.summarize(results, selected_rows, num_shards, settings["max_listed_missing"])
        sizes, written, missing_rows = done["sizes"], done["written"], done["missing"]
        stale = layout.remove_stale(output, done["keep"], so)
        fsio.write_json(fsio.join(output, "sizes.json"), sizes, so)
        info = {
            "total_samples": written, "shards": num_shards, "shard_size": shard_size, "format": fmt,
            "subset": subset, "filters": {"where": args.where, "limit": args.limit},
            "order": {"shuffle": settings["shuffle"], "seed": settings["seed"] if settings["shuffle"] else None},
            "source": layout.source_info(subset_path, datasets.stats_path(subset_path.rstrip("/").rsplit("/", 1)[0]), so),
            "missing_images": missing_rows, "plan": plan,
            "open_clip": layout.open_clip_command(output, num_shards, written) if fmt == "webdataset" else None,
        }
        fsio.write_json(fsio.join(output, "_info.json"), info, so)
    by_status = {k: v for k, v in (("success", written), ("missing_image", missing_rows)) if v}
    stats = {
        "input": subset_path, "output": output, "subset": subset, "format": fmt,
        "input_rows": selected_rows, "output_rows": written, "rejected_rows": missing_rows,
        "balanced": written + missing_rows == selected_rows,
        "by_status": by_status, "missing_images": done["listed"],
        "missing_listed_up_to": settings["max_listed_missing"], **done["shard_counts"],
        "stale_files_removed": stale, "plan": plan, "image_offsets": "recorded" if recorded else "tar headers",
        **timer.summary(),
    }
    datasets.write_stats(output, NAME, stats, storage_options=so)
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
