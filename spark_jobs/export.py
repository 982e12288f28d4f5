"""Training-ready output: one subset as shards that open_clip and Hugging Face `datasets` read as
they are, so a dataset built here trains a model with one more command.

    clipcrawl export --dataset <root>/dataset --subset laion2B-en --output <dir>
        [--where "punsafe < 0.5 AND WIDTH >= 256 AND similarity >= 0.3"] [--limit N]
        [--shuffle-seed S | --no-shuffle] [--format webdataset|parquet]

Writes under <dir> (udfs/export_shards.py has the file formats):
  {shard:05d}.tar   KEY.jpg (the image as download stored it, not re-encoded), KEY.txt, KEY.json
                    (the subset's LAION columns); export.shard_size samples each, the last one fewer.
                    --format parquet: {shard:05d}.parquet, image bytes as a Hugging Face Image column
  sizes.json        shard file -> samples (open_clip reads it when --train-num-samples is not given)
  _info.json        total samples, subset, filters, order, source, the open_clip command line
  manifest/         parquet, one row per selected subset row: key -> shard, or status missing_image
                    with the reason (a row whose image is not in its source shard is listed, never dropped)
  _markers/         one file per complete shard: a rerun skips those shards (resume)
  _stats/stats.json written last: counts, missing images (listed up to export.max_listed_missing)

Order: a deterministic shuffle across shards by default (rows sorted by xxhash64(seed, key)), because
training readers only shuffle within a buffer; --no-shuffle keeps the subset's order (file, row).
The same subset, filters and seed give byte-identical shards.

How it runs, on DataFrame APIs Spark Connect also has: (1) one task per source tar indexes its
members from the tar headers (mapInArrow); (2) the selected rows are joined to that index (rows
not found are the missing images); (3) each row gets its place in the order as a column (row_number
within range buckets of the sort key, plus the bucket's offset) and so its shard; (4) one
applyInArrow group per shard copies its images from the source tars by byte range (local files:
inside the kernel) and writes the shard, fsyncs it, then writes its marker.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/export.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

from spark_jobs import cli, datasets  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.datasets import InputError  # noqa: E402
from spark_jobs.schemas import EXPORT_MANIFEST, SUBSET  # noqa: E402
from udfs import export_shards, fsio  # noqa: E402

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
    parser.add_argument("--format", choices=export_shards.FORMATS, help="default: export.format")
    parser.add_argument("--where", help="a SQL predicate over the subset's columns, e.g. "
                                        "\"punsafe < 0.5 AND WIDTH >= 256 AND similarity >= 0.3\"")
    parser.add_argument("--limit", type=int, help="export only the first N selected rows (smoke tests)")
    parser.add_argument("--shuffle-seed", type=int, help="seed of the shuffle (default: export.shuffle_seed)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the subset's order")


def build_settings(cfg, args) -> dict:
    section = cfg.section("export")
    fmt = args.format or section["format"]
    if fmt not in export_shards.FORMATS:
        raise ConfigError(f"export.format must be one of {', '.join(export_shards.FORMATS)}, got {fmt!r}")
    ints = {}
    for key in ("shard_size", "read_chunk", "rank_bucket_rows", "max_listed_missing", "shuffle_seed"):
        try:
            ints[key] = int(section[key])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"export.{key} must be an integer, got {section[key]!r}") from exc
    for key in ("shard_size", "read_chunk", "rank_bucket_rows"):
        if ints[key] < 1:
            raise ConfigError(f"export.{key} must be >= 1, got {ints[key]}")
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    return {**ints, "format": fmt, "shuffle": not args.no_shuffle,
            "seed": args.shuffle_seed if args.shuffle_seed is not None else ints["shuffle_seed"],
            "storage_options": cfg.get("storage.storage_options") or None}


def resolve_subset(cfg, dataset: str, subset: str, storage_options=None) -> str:
    """The subset folder: <dataset>/<subset> (a filter output), <dataset>/<filter folder>/<subset>
    (a run root), or <dataset> itself (a subset folder)."""
    filter_dir = (cfg.get("run.datasets") or {}).get("filter", "dataset")
    candidates = [fsio.join(dataset, subset), fsio.join(dataset, filter_dir, subset)]
    for path in candidates:
        if fsio.exists(path, storage_options):
            return path
    not_a_subset = [fsio.join(dataset, datasets.STATS_DIR), fsio.join(dataset, "_run")]
    if not fsio.exists(dataset, storage_options) or any(fsio.exists(p, storage_options) for p in not_a_subset):
        # nothing there, or a filter output / run root without this subset
        raise InputError(f"subset {subset!r} not found: looked for {', '.join(candidates)}")
    return dataset


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


def with_order(spark, df, settings: dict):
    """Adds the sort columns; returns (df, global order, order within a bucket).

    Shuffled: `_h` = xxhash64(seed, key) without its sign bit (`shuffle_buckets` then makes the
    buckets ranges of `_h`). Subset order: `_bucket` = the parquet file's place among the subset's
    files (in name order), rows by their row number."""
    from pyspark.sql import functions as F

    if settings["shuffle"]:
        df = df.withColumn("_h", F.expr(f"xxhash64(CAST({int(settings['seed'])} AS BIGINT), key) "
                                        f"& 9223372036854775807"))
        return df, ["_h", "_file", "_row"], ["_h", "_file", "_row"]
    files = sorted(r["_file"] for r in df.select("_file").distinct().collect())
    file_ids = spark.createDataFrame([(f, i) for i, f in enumerate(files)], "_file string, _bucket bigint")
    df = df.join(F.broadcast(file_ids), "_file")
    return df, ["_bucket", "_row"], ["_row"]


def shuffle_buckets(df, rows: int, bucket_rows: int):
    """`_bucket` = the top bits of `_h`: ranges of the sort key of about `bucket_rows` rows each, so
    ranking bucket by bucket gives the global order without one task sorting every row."""
    from pyspark.sql import functions as F

    bits = 0 if rows <= bucket_rows else min(12, math.ceil(math.log2(rows / bucket_rows)))
    return df.withColumn("_bucket", F.expr(f"shiftrightunsigned(_h, {63 - bits})") if bits
                         else F.expr("CAST(0 AS BIGINT)"))


def _index_schema():
    from pyspark.sql import types as T

    return T.StructType([T.StructField("tar_path", T.StringType()), T.StructField("key", T.StringType()),
                         T.StructField("ext", T.StringType()), T.StructField("offset", T.LongType()),
                         T.StructField("size", T.LongType()), T.StructField("error", T.StringType())])


def index_sources(spark, tars: list[str], storage_options):
    """One row per image member of each source tar (read from the headers, one task per tar), plus
    a row with key null and `error` for a tar that is missing or unreadable (in part)."""
    index_schema = _index_schema()

    def index_batches(batches):
        import pyarrow as pa

        from udfs.export_shards import index_tar

        arrow = pa.schema([("tar_path", pa.string()), ("key", pa.string()), ("ext", pa.string()),
                           ("offset", pa.int64()), ("size", pa.int64()), ("error", pa.string())])
        for batch in batches:
            out = {name: [] for name in arrow.names}
            for uri in batch.column("tar_path").to_pylist():
                members, error = index_tar(uri, storage_options)
                rows = [{**m, "tar_path": uri, "error": None} for m in members]
                if error:
                    rows.append({"tar_path": uri, "key": None, "ext": None, "offset": None, "size": None,
                                 "error": error})
                for r in rows:
                    for name in arrow.names:
                        out[name].append(r[name])
            yield pa.RecordBatch.from_pydict(out, schema=arrow)

    tar_df = spark.createDataFrame([(i, t) for i, t in enumerate(tars)], "tar_id int, tar_path string")
    # round-robin: one tar per task without the sampling job a range partitioning runs first
    return tar_df.repartition(max(1, len(tars))).mapInArrow(index_batches, index_schema)


def _result_schema():
    from pyspark.sql import types as T

    return T.StructType([T.StructField("shard", T.IntegerType()), T.StructField("file", T.StringType()),
                         T.StructField("samples", T.LongType()), T.StructField("bytes", T.LongType()),
                         T.StructField("image_bytes", T.LongType()), T.StructField("status", T.StringType()),
                         T.StructField("seconds", T.DoubleType())])


def write_shards(positioned, output: str, worker_settings: dict) -> list[dict]:
    """One applyInArrow group per export shard: read its images by range, write it, then its marker."""
    def write_group(table):
        import pyarrow as pa

        from udfs.export_shards import write_shard

        rows = table.to_pylist()
        res = write_shard(output, int(rows[0]["shard"]), rows, worker_settings)
        arrow = pa.schema([("shard", pa.int32()), ("file", pa.string()), ("samples", pa.int64()),
                           ("bytes", pa.int64()), ("image_bytes", pa.int64()), ("status", pa.string()),
                           ("seconds", pa.float64())])
        return pa.Table.from_pylist([res], schema=arrow)

    cols = ["shard", "position", "tar_path", "offset", "size", "ext", *export_shards.LAION_COLUMNS]
    return [r.asDict() for r in positioned.select(*cols).groupBy("shard")
            .applyInArrow(write_group, _result_schema()).collect()]


def source_fingerprint(path: str, storage_options=None) -> list:
    """(name, size) of the subset's files: a changed subset is another export plan."""
    fs, root = fsio.filesystem(path, storage_options)
    try:
        entries = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("size")) for e in entries
                  if e.get("type") == "file" and not e["name"].rsplit("/", 1)[-1].startswith(("_", ".")))


def _source_info(subset_path: str, storage_options) -> dict:
    """Where the subset came from: the filter stage's stats beside it, when present."""
    parent = subset_path.rstrip("/").rsplit("/", 1)[0]
    info = {"subset_path": subset_path}
    try:
        stats = datasets.read_stats(parent, storage_options=storage_options)
        info["filter"] = {k: stats.get(k) for k in ("written_at", "input", "thresholds", "language_detector")}
    except (FileNotFoundError, ValueError, OSError):
        info["filter"] = None
    return info


def _remove(uri: str, storage_options) -> None:
    fs, path = fsio.filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path)


def open_clip_command(output: str, shards: int, samples: int) -> str:
    last = f"{max(shards - 1, 0):05d}"
    return (f"--train-data '{output.rstrip('/')}/{{00000..{last}}}.tar' --train-num-samples {samples} "
            f"--dataset-type webdataset")


def run(spark, cfg, args) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    timer = datasets.StageTimer()
    settings = build_settings(cfg, args)
    so = settings["storage_options"]
    subset = args.subset or cfg.get("filter.subsets.en")
    subset_path = resolve_subset(cfg, args.dataset, subset, so)
    output = args.output
    with timer.phase("select"):
        df, order, within = with_order(spark, select_rows(spark, subset_path, args.where), settings)
        if args.limit is not None:
            df = df.orderBy(*order).limit(args.limit)
        # one job gives the row count (bucket sizes) and the source tars to index
        per_tar = {r["tar_path"]: int(r["count"]) for r in df.groupBy("tar_path").count().collect()}
        selected_rows = sum(per_tar.values())
        if settings["shuffle"]:
            df = shuffle_buckets(df, selected_rows, settings["rank_bucket_rows"])
    # An earlier export's final files must not make a partial rerun look complete.
    for name in (datasets.stats_path(output), *(fsio.join(output, f) for f in FINAL_FILES)):
        _remove(name, so)
    fs, out_path = fsio.filesystem(output, so)
    fs.makedirs(out_path, exist_ok=True)

    with timer.phase("index"):
        tars = sorted(t for t in per_tar if t is not None)
        index = index_sources(spark, tars, so) if tars else spark.createDataFrame([], _index_schema())
        # persisted: both branches of the join below read it, and each read would re-read every tar
        index = index.persist(StorageLevel.MEMORY_AND_DISK)
        members = index.where(F.col("key").isNotNull()).select("tar_path", "key", "ext", "offset", "size")
        tar_errors = (index.where(F.col("key").isNull()).groupBy("tar_path")
                      .agg(F.min("error").alias("_tar_error")))
        joined = (df.join(members, ["tar_path", "key"], "left").join(F.broadcast(tar_errors), ["tar_path"], "left")
                  .persist(StorageLevel.MEMORY_AND_DISK))
    positioned = None
    try:
        with timer.phase("order"):
            found = joined.where(F.col("offset").isNotNull())
            counts = {int(r["_bucket"]): int(r["count"]) for r in found.groupBy("_bucket").count().collect()}
            offsets, total = [], 0
            for bucket in sorted(counts):
                offsets.append((bucket, total))
                total += counts[bucket]
            shard_size = settings["shard_size"]
            num_shards = math.ceil(total / shard_size)
            fmt = settings["format"]
            plan = export_shards.plan_id({
                "subset": subset_path, "source": source_fingerprint(subset_path, so), "where": args.where,
                "limit": args.limit, "shuffle": settings["shuffle"], "seed": settings["seed"],
                "shard_size": shard_size, "format": fmt, "samples": total})
            offsets_df = spark.createDataFrame(offsets or [(0, 0)], "_bucket bigint, _offset bigint")
            rank = F.row_number().over(Window.partitionBy("_bucket").orderBy(*within))
            positioned = (found.join(F.broadcast(offsets_df), "_bucket")
                          .withColumn("position", F.col("_offset") + rank - 1)
                          .withColumn("shard", F.expr(f"CAST(position DIV {shard_size} AS INT)"))
                          .persist(StorageLevel.MEMORY_AND_DISK))   # read by the shard writers and the manifest
        log.info("export: %d selected rows, %d with their image -> %d shards of %d (%s, %s)", selected_rows,
                 total, num_shards, shard_size, fmt,
                 f"seed {settings['seed']}" if settings["shuffle"] else "subset order")
        worker_settings = {"format": fmt, "plan": plan, "read_chunk": settings["read_chunk"],
                           "storage_options": so}
        with timer.phase("write_shards"):
            results = write_shards(positioned, output, worker_settings) if total else []
        with timer.phase("manifest"):
            shard_file = F.concat(F.lpad(F.col("shard").cast("string"), 5, "0"),
                                  F.lit(export_shards.SUFFIX[fmt]))
            exported = positioned.select("key", "SAMPLE_ID", "shard", shard_file.alias("shard_file"), "position",
                                         "tar_path", F.lit("success").alias("status"),
                                         F.expr("CAST(NULL AS STRING)").alias("error_message"))
            reason = (F.when(F.col("tar_path").isNull(), F.lit("no source shard (tar_path is null)"))
                      .when(F.col("_tar_error").isNotNull(),
                            F.concat(F.lit("not in source shard "), F.col("tar_path"), F.lit(" ("),
                                     F.col("_tar_error"), F.lit(")")))
                      .otherwise(F.concat(F.lit("not in source shard "), F.col("tar_path"))))
            missing = joined.where(F.col("offset").isNull()).select(
                "key", "SAMPLE_ID", F.expr("CAST(NULL AS INT)").alias("shard"),
                F.expr("CAST(NULL AS STRING)").alias("shard_file"), F.expr("CAST(NULL AS BIGINT)").alias("position"),
                "tar_path", F.lit("missing_image").alias("status"), reason.alias("error_message"))
            manifest_path = fsio.join(output, MANIFEST_DIR)
            datasets.write_dataset(exported.unionByName(missing), manifest_path, EXPORT_MANIFEST)
    finally:
        for frame in (positioned, joined, index):
            if frame is not None:
                frame.unpersist()

    with timer.phase("stats"):
        by_status = datasets.count_by(spark, manifest_path, "status")
        listed = []
        if by_status.get("missing_image"):
            listed = [r.asDict() for r in spark.read.parquet(manifest_path)
                      .where(F.col("status") == "missing_image").orderBy("tar_path", "key")
                      .select("key", "SAMPLE_ID", "tar_path", "error_message")
                      .limit(settings["max_listed_missing"]).collect()]
        sizes = {r["file"]: int(r["samples"]) for r in sorted(results, key=lambda r: r["shard"])}
        written = sum(sizes.values())
        if written != by_status.get("success", 0) or len(sizes) != num_shards:
            raise RuntimeError(f"export wrote {written} samples in {len(sizes)} shards, but the manifest "
                               f"lists {by_status.get('success', 0)} in {num_shards}")
        keep = set(sizes) | {f"{export_shards.MARKERS_DIR}/{export_shards.shard_name(r['shard'])}.json"
                             for r in results}
        stale = export_shards.remove_stale(output, keep, so)
        fsio.write_json(fsio.join(output, "sizes.json"), sizes, so)
        info = {
            "total_samples": written, "shards": num_shards, "shard_size": shard_size, "format": fmt,
            "subset": subset, "filters": {"where": args.where, "limit": args.limit},
            "order": {"shuffle": settings["shuffle"], "seed": settings["seed"] if settings["shuffle"] else None},
            "source": _source_info(subset_path, so),
            "missing_images": by_status.get("missing_image", 0), "plan": plan,
            "open_clip": open_clip_command(output, num_shards, written) if fmt == "webdataset" else None,
        }
        fsio.write_json(fsio.join(output, "_info.json"), info, so)
    selected = sum(by_status.values())
    stats = {
        "input": subset_path, "output": output, "subset": subset, "format": fmt,
        "input_rows": selected, "output_rows": written, "rejected_rows": by_status.get("missing_image", 0),
        "balanced": written + by_status.get("missing_image", 0) == selected == selected_rows,
        "by_status": by_status, "missing_images": listed, "missing_listed_up_to": settings["max_listed_missing"],
        "shards": num_shards, "shards_written": sum(1 for r in results if r["status"] == "written"),
        "shards_skipped": sum(1 for r in results if r["status"] == "skipped"),
        "bytes": sum(int(r["bytes"]) for r in results), "image_bytes": sum(int(r["image_bytes"]) for r in results),
        "stale_files_removed": stale, "plan": plan, **timer.summary(),
    }
    datasets.write_stats(output, NAME, stats, storage_options=so)
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
