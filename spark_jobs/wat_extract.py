"""Extract image URL / alt-text pairs from Common Crawl WAT files (or WARC/ARC files with --format warc).

One input file is one Spark task: the file is streamed through fsspec (local, s3://, https://),
decompressed member by member and parsed record by record, so a task never holds more than one
record. Each file is parsed once: its pairs, rejected links/records and its outcome row go to one
disk-persisted DataFrame that is then split into the three outputs:

  <output>/crawl=.../*.parquet         kept pairs (schemas.WAT_PAIRS, partitioned by crawl)
  <rejected-output>/status=.../        rejected links and records with status + error_message
  <output>/_stats/file_outcomes/       one row per input file (ok | partial | failed, counts)
  <output>/_stats/stats.json           totals read back from the written data (written last)

Bad input never stops the job: a missing, empty, non-gzip or truncated file gets status failed or
partial (pairs before a truncation are kept); invalid JSON, records missing fields and unusable
links become rejected rows with their reason. What real crawlers wrote (WARC/0.17-1.1, ARC, bare-LF
headers, lying Content-Length, encodings that do not match the stored body) is read by
udfs.extract.warc_records / udfs.extract.http_message; each record is read or counted as lost with a reason.

Examples:
  clipcrawl wat-extract --input 'data/*.warc.wat.gz' --output out/wat_pairs
  clipcrawl wat-extract --paths-file s3://commoncrawl/crawl-data/CC-MAIN-2024-22/wat.paths.gz \\
      --output s3://bucket/wat_pairs --profile emr
  clipcrawl wat-extract --format warc --input tests/fixtures/commoncrawl/whirlwind.warc.gz --output /tmp/p
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/wat_extract.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import argparse  # noqa: E402 - after the sys.path fix above
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

from spark_jobs import cli, datasets, schemas  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.datasets import InputError  # noqa: E402
from udfs.extract.stats import extract_stats  # noqa: E402

NAME = "wat-extract"
HELP = "Common Crawl WAT/WARC files -> image URL / alt-text pairs (wat_pairs)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", default=[], metavar="PATH",
                        help="WAT/WARC/ARC files (gzip, zstd or none, told by content): paths, "
                             "URIs (s3://, https://) or globs")
    parser.add_argument("--paths-file", metavar="PATH",
                        help="a file listing one WAT path per line, plain or .gz (like wat.paths.gz); "
                             "relative entries are resolved against wat_extract.paths_base")
    parser.add_argument("--output", required=True, help="output dataset (wat_pairs)")
    parser.add_argument("--rejected-output", default=None,
                        help="rejected links/records (default: <output>_rejected)")
    parser.add_argument("--format", choices=["wat", "warc"], default=None,
                        help="input format (default: wat_extract.format); warc also reads "
                             "ARC files (.arc, .arc.gz)")


def _staging_schema():
    """One row type for everything a file yields, so each file is parsed exactly once."""
    from pyspark.sql import types as T

    s = T.StringType()
    return T.StructType([
        T.StructField("kind", s, False),            # pair | reject | file
        *schemas.WAT_PAIRS.schema.fields[:-1],      # uid .. page_opt_out
        T.StructField("crawl", s, True),
        T.StructField("status", s, True),
        T.StructField("error_message", s, True),
        T.StructField("level", s, True),
        T.StructField("outcome", s, True),          # JSON of udfs.extract.wat.FileOutcome (kind=file)
    ])


def _partition_extractor(opts, storage_options):
    """The per-task function: rows of the files of one partition (one file by default)."""

    def extract(files):
        from udfs.extract import wat

        task_log = logging.getLogger("clipcrawl.wat_extract.task")
        for uri in files:
            for row in wat.extract_file(uri, opts, storage_options):
                if isinstance(row, wat.Pair):
                    yield ("pair", *row, None, None, None, None)
                elif isinstance(row, wat.Rejected):
                    yield ("reject", None, row.url, row.text, row.page_url, row.source_file,
                           row.record_id, None, None, None, row.crawl, row.status, row.error_message,
                           row.level, None)
                else:
                    task_log.info("%s: %s, %d records, %d pairs kept, %d rejected in %.1fs", uri,
                                  row.status, row.records_read, row.pairs_kept, row.pairs_rejected,
                                  row.seconds)
                    yield ("file", None, None, None, None, row.source_file, None, None, None, None,
                           wat.crawl_of(uri), row.status, row.error_message, None,
                           json.dumps(wat.outcome_dict(row)))

    return extract


def _extracted(spark, files: list[str], slices: int, extractor):
    """The staged rows of all files, by DataFrame operations only (Spark Connect has no RDDs):
    `spark.range` numbers the files into `slices` partitions of consecutive files, as
    the former RDD parallelize did, and a Python table function (plain pickled rows, no Arrow, so
    the driver imports neither pandas nor pyarrow) runs `extractor` over each file's path."""
    from pyspark.sql import functions as F

    schema = _staging_schema()
    names = list(files)

    class ExtractFile:
        def eval(self, index: int):
            yield from extractor(iter([names[index]]))

    extract = F.udtf(ExtractFile, returnType=schema, useArrow=False)
    ids = spark.range(0, len(names), 1, slices)
    return ids.lateralJoin(extract(F.col("id").outer())).select(*schema.fieldNames())


def resolve_inputs(cfg, args, storage_options) -> list[str]:
    """Input files from --input (globs expanded) and --paths-file, in order, without duplicates.

    A glob that matches nothing or a missing paths file is a user error; a plain path that does
    not exist is kept and counted as a failed file (a paths list pointing at a missing object
    must not stop a 80,000-file job)."""
    from udfs import fsio
    from udfs.extract import wat

    if not args.input and not args.paths_file:
        raise InputError("give --input and/or --paths-file")
    files: list[str] = []
    for pattern in args.input:
        matched = fsio.expand([pattern], storage_options)
        if not matched:
            raise InputError(f"--input {pattern!r} matches no file")
        for path in matched:
            files.extend(_files_in(path, storage_options))
    if args.paths_file:
        if not fsio.exists(args.paths_file, storage_options):
            raise InputError(f"paths file not found: {args.paths_file}")
        base = cfg.get("wat_extract.paths_base") or ""
        try:
            listed = wat.read_paths_list(args.paths_file, base, storage_options)
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # corrupt gzip, unreadable object
            raise InputError(f"cannot read paths file {args.paths_file}: {exc}") from exc
        if not listed:
            raise InputError(f"paths file {args.paths_file} lists no path")
        files.extend(listed)
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _files_in(path: str, storage_options) -> list[str]:
    """A folder given as --input stands for the files directly in it (sorted, hidden ones and
    Spark/Hadoop markers skipped); anything else is kept as it is."""
    from udfs import fsio

    fs, fs_path = fsio.filesystem(path, storage_options)
    try:
        is_dir = fs.isdir(fs_path)
    except Exception:  # noqa: BLE001 - an unreachable path is reported per file later
        is_dir = False
    if not is_dir:
        return [path]
    names = sorted(e["name"] for e in fs.ls(fs_path, detail=True) if e.get("type") == "file")
    names = [n for n in names if not n.rsplit("/", 1)[-1].startswith((".", "_"))]
    return [fsio.join(path, n.rsplit("/", 1)[-1]) for n in names]


def run(spark, cfg, args) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from udfs.extract import wat

    section = cfg.section("wat_extract")
    storage_options = cfg.get("storage.storage_options") or {}
    try:
        opts = wat.ExtractOptions.from_config(section, args.format)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    output = args.output
    rejected_out = datasets.rejected_path(output, args.rejected_output)
    timer = datasets.StageTimer()

    with timer.phase("list inputs"):
        files = resolve_inputs(cfg, args, storage_options)
    log.info("%d input files (%s, reader %s)", len(files), opts.fmt, opts.reader)
    per_task = max(1, int(section.get("files_per_task", 1)))
    slices = max(1, -(-len(files) // per_task))
    staged = _extracted(spark, files, slices, _partition_extractor(opts, storage_options)).persist(
        StorageLevel.DISK_ONLY)
    try:
        with timer.phase("extract + write pairs"):
            pairs = staged.filter(F.col("kind") == "pair")
            n_out = max(1, int(section.get("output_partitions", 16)))
            datasets.write_dataset(pairs.repartition(n_out), output, schemas.WAT_PAIRS)
        with timer.phase("write rejected"):
            datasets.write_dataset(staged.filter(F.col("kind") == "reject").coalesce(n_out),
                                   rejected_out, schemas.WAT_REJECTED)
        outcomes_path = datasets.stats_path(output, "file_outcomes")
        with timer.phase("write file outcomes"):
            parsed = staged.filter(F.col("kind") == "file").select(
                F.from_json("outcome", schemas.WAT_FILE_OUTCOMES.schema).alias("o")).select("o.*")
            datasets.write_dataset(parsed.coalesce(1), outcomes_path, schemas.WAT_FILE_OUTCOMES)
    finally:
        staged.unpersist()

    with timer.phase("stats"):
        stats = _stats_from_data(spark, output, rejected_out, outcomes_path)
    stats.update({"input_files": len(files), "format": opts.fmt, "reader": opts.reader,
                  "output": output, "rejected_output": rejected_out, "file_outcomes": outcomes_path,
                  "config": {k: section.get(k) for k in ("min_alt_length", "max_alt_length", "schemes")},
                  **timer.summary()})
    datasets.write_stats(output, NAME, stats, storage_options=storage_options)
    return stats


def _stats_from_data(spark, output: str, rejected_out: str, outcomes_path: str) -> dict:
    """Totals from the written datasets (never from accumulators), in three small Spark jobs."""
    kept = datasets.grouped_counts(spark, output, "crawl", "alt_truncated")
    rejected = datasets.grouped_counts(spark, rejected_out, "status", "level")
    # One row per input file: small enough to aggregate on the driver even for a whole crawl.
    outcomes = [r.asDict() for r in spark.read.parquet(outcomes_path).collect()]
    return extract_stats(kept, rejected, outcomes)


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
