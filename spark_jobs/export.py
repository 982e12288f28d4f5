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

How it runs, on DataFrame APIs Spark Connect also has, in two Spark jobs and no join, window or
persist: (1) the rows of each source tar go to one task group, which reads the tar's member table
from its headers and looks the rows up in it (rows not found are the missing images), and counts
the found rows per bucket (ranges of the sort key); the driver turns the counts into each bucket's
first position. (2) The same lookup again, then each row goes to the shard(s) its bucket overlaps
(udfs.export_shards.place); one applyInArrow group per shard ranks its buckets' rows (exact, as it
has all of them), copies its images from the source tars by byte range (local files: inside the
kernel), writes the shard, fsyncs it, writes its marker and its part of manifest/. What those tasks
return gives sizes.json, _info.json and the stats, checked against job (1)'s counts.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/export.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
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
# job 1's output, read by job 2, removed after it (not _-named: Spark would skip the folder)
LOCATED_DIR = "located.tmp"
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


def with_order(df, settings: dict, rows_hint: int | None = None):
    """Adds the sort columns; returns (df, bucket columns, order within a bucket).

    Shuffled: `_h` = xxhash64(seed, key) without its sign bit, `_bucket` = its top bits (ranges of
    the sort key, see bucket_bits), rows in a bucket by (`_h`, file, row). Subset order: the bucket
    is (parquet file, block of `_row`), rows by their row number: files in name order as Spark
    sorts strings, each file in its own order."""
    from pyspark.sql import functions as F

    if settings["shuffle"]:
        bits = bucket_bits(rows_hint, settings)
        df = df.withColumn("_h", F.expr(f"xxhash64(CAST({int(settings['seed'])} AS BIGINT), key) "
                                        f"& 9223372036854775807"))
        df = df.withColumn("_bucket", F.expr(f"shiftrightunsigned(_h, {63 - bits})") if bits
                           else F.expr("CAST(0 AS BIGINT)"))
        return df, ["_bucket"], ["_h", "_file", "_row"]
    df = df.withColumn("_blk", F.expr(f"CAST(_row DIV {bucket_rows(settings)} AS BIGINT)"))
    return df, ["_file", "_blk"], ["_row"]


def bucket_rows(settings: dict) -> int:
    """Rows per bucket: at most an eighth of a shard, so about one row in eight lies in a bucket that
    straddles two shards (and is sent to both); at most export.rank_bucket_rows (one task sorts it)."""
    return max(1, min(settings["rank_bucket_rows"], settings["shard_size"] // 8))


def bucket_bits(rows: int | None, settings: dict) -> int:
    """Top bits of the hash that make buckets of about bucket_rows rows (at most 2^20 buckets)."""
    target = bucket_rows(settings)
    if not rows or rows <= target:
        return 0
    return min(20, math.ceil(math.log2(rows / target)))


def _partitions(spark) -> int:
    """Tasks of the grouped stages: spark.sql.shuffle.partitions, fixed by an explicit repartition
    so adaptive execution does not fold the small (metadata-only) shuffles into one task."""
    try:
        return max(1, int(spark.conf.get("spark.sql.shuffle.partitions")))
    except (TypeError, ValueError):
        return 200


def row_count_hint(spark, path: str, limit: int | None, storage_options) -> int:
    """The subset's row count from its parquet footers (no Spark job), an upper bound of the
    selected rows: it sizes the buckets, which only decides how many rows go to two shards."""
    import pyarrow.parquet as pq

    fs, root = fsio.filesystem(path, storage_options)
    try:
        files = [f for f in fs.find(root) if f.endswith(".parquet") and "/_" not in f[len(root):]]
        rows = 0
        for f in files:
            with fs.open(f, "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
    except (OSError, ValueError):
        rows = datasets.read_dataset(spark, path, SUBSET).count()
    return rows if limit is None else min(rows, limit)


LOCATED_FIELDS = (("ext", "string"), ("offset", "bigint"), ("size", "bigint"), ("error_message", "string"))
PLACED_FIELDS = (("shard", "int"), ("_bidx", "bigint"), ("_offset", "bigint"))


def _with_fields(schema, extra):
    from pyspark.sql import types as T

    types = {"string": T.StringType(), "bigint": T.LongType(), "int": T.IntegerType()}
    return T.StructType([*schema.fields, *(T.StructField(n, types[t]) for n, t in extra)])


def locate_rows(spark, df, bucket_cols: list[str], located_dir: str, storage_options):
    """Job 1: the rows of each source tar go to one task group, which reads the tar's member table,
    looks the rows up in it, writes them with their image's byte range to located_dir (one file
    per tar, read by job 2: no second read of the tar headers) and returns the found / missing
    rows per bucket. Returns [(bucket key, found, missing)] summed over the tars."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def locate_group(table):
        from udfs import fsio as io_
        from udfs.export_shards import bucket_counts, locate, located_name, parquet_bytes

        located = locate(table, storage_options)
        tar = table.column("tar_path")[0].as_py()
        # uncompressed: read once, by job 2, then deleted
        io_.write_bytes_atomic(io_.join(located_dir, located_name(tar)), parquet_bytes(located, "none"),
                              storage_options, durable=False)
        return bucket_counts(located, bucket_cols)

    types = {f.name: f.dataType for f in df.schema.fields}
    out = T.StructType([*(T.StructField(c, types[c]) for c in bucket_cols),
                        T.StructField("found", T.LongType()), T.StructField("missing", T.LongType())])
    rows = (df.repartition(_partitions(spark), "tar_path")
            .groupBy("tar_path").applyInArrow(locate_group, out)
            .groupBy(*bucket_cols).agg(F.sum("found").alias("found"), F.sum("missing").alias("missing"))
            .collect())
    return [(tuple(r[c] for c in bucket_cols), int(r["found"]), int(r["missing"])) for r in rows]


def _result_schema():
    from pyspark.sql import types as T

    return T.StructType([T.StructField("shard", T.IntegerType()), T.StructField("file", T.StringType()),
                         T.StructField("samples", T.LongType()), T.StructField("bytes", T.LongType()),
                         T.StructField("image_bytes", T.LongType()), T.StructField("status", T.StringType()),
                         T.StructField("seconds", T.DoubleType()), T.StructField("missing", T.LongType()),
                         T.StructField("listed", T.StringType())])


def write_shards(spark, located, bucket_cols, within, buckets, num_shards, output, worker_settings) -> list[dict]:
    """Job 2: the located rows (job 1's files) placed batch by batch, then one group per shard
    ranks its buckets' rows, writes the shard and its marker, and its manifest/ part. The rows
    without their image form one more group (shard null): their manifest part, and the first
    export.max_listed_missing of them for the stats."""
    import json

    so, shard_size, fmt = worker_settings["storage_options"], worker_settings["shard_size"], worker_settings["format"]
    placed_schema = _with_fields(located.schema, PLACED_FIELDS)

    def place_batches(batches):
        import pyarrow as pa

        from udfs.export_shards import place

        for batch in batches:
            yield from place(pa.Table.from_batches([batch]), bucket_cols, buckets, shard_size).to_batches()

    def write_group(table):
        import pyarrow as pa

        from udfs import fsio as io_
        from udfs.export_shards import manifest_part, shard_rows, write_shard

        arrow = pa.schema([("shard", pa.int32()), ("file", pa.string()), ("samples", pa.int64()),
                           ("bytes", pa.int64()), ("image_bytes", pa.int64()), ("status", pa.string()),
                           ("seconds", pa.float64()), ("missing", pa.int64()), ("listed", pa.string())])
        shard = table.column("shard")[0].as_py()
        part = io_.join(output, MANIFEST_DIR)
        if shard is None:   # the rows without their image
            io_.write_bytes_atomic(io_.join(part, "part-missing.parquet"), manifest_part(table, None, fmt), so,
                                  durable=False)
            listed = (table.select(["key", "SAMPLE_ID", "tar_path", "error_message"])
                      .sort_by([("tar_path", "ascending"), ("key", "ascending")])
                      .slice(0, worker_settings["max_listed_missing"]).to_pylist())
            res = {"shard": None, "file": None, "samples": 0, "bytes": 0, "image_bytes": 0, "status": "missing",
                   "seconds": 0.0, "missing": table.num_rows, "listed": json.dumps(listed)}
        else:
            rows = shard_rows(table, shard, shard_size, within)
            res = write_shard(output, shard, rows, worker_settings)
            io_.write_bytes_atomic(io_.join(part, f"part-{shard:05d}.parquet"), manifest_part(rows, shard, fmt), so,
                                  durable=False)
            res.update(missing=0, listed=None)
        return pa.Table.from_pylist([res], schema=arrow)

    parts = max(1, min(_partitions(spark), num_shards + 1))
    return [r.asDict() for r in located.mapInArrow(place_batches, placed_schema)
            .repartition(parts, "shard").groupBy("shard")
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
    timer = datasets.StageTimer()
    settings = build_settings(cfg, args)
    so = settings["storage_options"]
    subset = args.subset or cfg.get("filter.subsets.en")
    subset_path = resolve_subset(cfg, args.dataset, subset, so)
    output = args.output
    fmt, shard_size = settings["format"], settings["shard_size"]
    with timer.phase("select"):
        selected = select_rows(spark, subset_path, args.where)
        hint = row_count_hint(spark, subset_path, args.limit, so)
        df, bucket_cols, within = with_order(selected, settings, hint)
        if args.limit is not None:
            df = df.orderBy(*(["_h", "_file", "_row"] if settings["shuffle"] else ["_file", "_row"])).limit(args.limit)
    # An earlier export's final files must not make a partial rerun look complete.
    for name in (datasets.stats_path(output), *(fsio.join(output, f) for f in FINAL_FILES)):
        _remove(name, so)
    manifest_path = fsio.join(output, MANIFEST_DIR)
    fs, out_path = fsio.filesystem(output, so)
    fs.makedirs(out_path, exist_ok=True)

    located_dir = fsio.join(output, LOCATED_DIR)
    for folder in (manifest_path, located_dir):   # both rewritten whole below, resumed or not
        if fs.exists(fsio.filesystem(folder, so)[1]):
            fs.rm(fsio.filesystem(folder, so)[1], recursive=True)
    with timer.phase("plan"):
        counts = locate_rows(spark, df, bucket_cols, located_dir, so)
        buckets = export_shards.bucket_offsets([(key, found) for key, found, _ in counts])
        total = sum(found for _, found, _ in counts)
        missing_planned = sum(missing for _, _, missing in counts)
        selected_rows = total + missing_planned
        num_shards = math.ceil(total / shard_size)
        plan = export_shards.plan_id({
            "subset": subset_path, "source": source_fingerprint(subset_path, so), "where": args.where,
            "limit": args.limit, "shuffle": settings["shuffle"], "seed": settings["seed"],
            "shard_size": shard_size, "format": fmt, "samples": total})
    log.info("export: %d selected rows, %d with their image -> %d shards of %d (%s, %s)", selected_rows,
             total, num_shards, shard_size, fmt,
             f"seed {settings['seed']}" if settings["shuffle"] else "subset order")
    worker_settings = {"format": fmt, "plan": plan, "read_chunk": settings["read_chunk"], "storage_options": so,
                       "shard_size": shard_size, "max_listed_missing": settings["max_listed_missing"]}
    with timer.phase("write_shards"):
        results = []
        if selected_rows:
            located = spark.read.schema(_with_fields(df.schema, LOCATED_FIELDS)).parquet(located_dir)
            results = write_shards(spark, located, bucket_cols, within, buckets, num_shards, output, worker_settings)
        if fs.exists(fsio.filesystem(located_dir, so)[1]):
            fs.rm(fsio.filesystem(located_dir, so)[1], recursive=True)
    with timer.phase("stats"):
        if not selected_rows:   # an empty manifest of the declared schema
            datasets.write_dataset(spark.createDataFrame([], EXPORT_MANIFEST.schema), manifest_path, EXPORT_MANIFEST)
        shards = sorted((r for r in results if r["shard"] is not None), key=lambda r: r["shard"])
        missing_rows = sum(int(r["missing"]) for r in results)
        listed = [m for r in results if r["listed"] for m in json.loads(r["listed"])]
        sizes = {r["file"]: int(r["samples"]) for r in shards}
        written = sum(sizes.values())
        # the counts of the two jobs (job 1 counted, the writers wrote) must agree
        if written != total or len(sizes) != num_shards or missing_rows != missing_planned:
            raise RuntimeError(f"export wrote {written} samples in {len(sizes)} shards and listed {missing_rows} "
                               f"missing images, but planned {total} in {num_shards} and {missing_planned} missing")
        keep = set(sizes) | {f"{export_shards.MARKERS_DIR}/{export_shards.shard_name(r['shard'])}.json"
                             for r in shards}
        stale = export_shards.remove_stale(output, keep, so)
        fsio.write_json(fsio.join(output, "sizes.json"), sizes, so)
        info = {
            "total_samples": written, "shards": num_shards, "shard_size": shard_size, "format": fmt,
            "subset": subset, "filters": {"where": args.where, "limit": args.limit},
            "order": {"shuffle": settings["shuffle"], "seed": settings["seed"] if settings["shuffle"] else None},
            "source": _source_info(subset_path, so),
            "missing_images": missing_rows, "plan": plan,
            "open_clip": open_clip_command(output, num_shards, written) if fmt == "webdataset" else None,
        }
        fsio.write_json(fsio.join(output, "_info.json"), info, so)
    by_status = {k: v for k, v in (("success", written), ("missing_image", missing_rows)) if v}
    stats = {
        "input": subset_path, "output": output, "subset": subset, "format": fmt,
        "input_rows": selected_rows, "output_rows": written, "rejected_rows": missing_rows,
        "balanced": written + missing_rows == selected_rows,
        "by_status": by_status, "missing_images": listed, "missing_listed_up_to": settings["max_listed_missing"],
        "shards": num_shards, "shards_written": sum(1 for r in shards if r["status"] == "written"),
        "shards_skipped": sum(1 for r in shards if r["status"] == "skipped"),
        "bytes": sum(int(r["bytes"]) for r in shards), "image_bytes": sum(int(r["image_bytes"]) for r in shards),
        # time inside the shard tasks' write_shard (copies, fsyncs, markers), summed over the tasks:
        # against write_shards' wall time it shows what the Spark job adds
        "shard_task_seconds": round(sum(float(r["seconds"]) for r in shards), 3),
        "stale_files_removed": stale, "plan": plan, **timer.summary(),
    }
    datasets.write_stats(output, NAME, stats, storage_options=so)
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
