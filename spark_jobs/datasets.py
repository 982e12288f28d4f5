"""Dataset IO for the stages: declared-schema parquet reads and writes, rejected-row datasets,
and the per-stage stats JSON that sits next to each output.

Counts in stats come from the written data (group by `status`), never from accumulators, which
Spark may apply twice when a task is retried.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.schemas import DatasetSpec
from udfs import fsio

log = logging.getLogger(__name__)

STATS_DIR = "_stats"
STATS_FILE = "stats.json"


class InputError(ValueError):
    """A stage input the user must fix: missing, unreadable, or of the wrong schema."""


def rejected_path(output: str, explicit: str | None = None) -> str:
    """Rejected rows of a stage go to `<output>_rejected` unless the user names a path."""
    return explicit or output.rstrip("/") + "_rejected"


def stats_path(output: str, name: str = STATS_FILE) -> str:
    return fsio.join(output, STATS_DIR, name)


def _type_compatible(actual: T.DataType, declared: T.DataType) -> bool:
    if actual == declared:
        return True
    widen = {T.IntegerType(): {T.LongType()}, T.FloatType(): {T.DoubleType()}}
    return declared in widen.get(actual, set())


def check_schema(df: DataFrame, spec: DatasetSpec, path: str = "") -> None:
    actual = {f.name: f.dataType for f in df.schema.fields}
    declared = {f.name: f.dataType for f in spec.schema.fields}
    missing = [c for c in spec.required_columns if c not in actual]
    mistyped = [f"{c} is {actual[c].simpleString()}, expected {declared[c].simpleString()}"
                for c in spec.required_columns
                if c in actual and not _type_compatible(actual[c], declared[c])]
    if missing or mistyped:
        where = f" at {path}" if path else ""
        problems = ([f"missing columns: {', '.join(missing)}"] if missing else []) + mistyped
        raise InputError(f"dataset{where} does not match the declared schema of "
                         f"'{spec.name}': " + "; ".join(problems))


def conform(df: DataFrame, spec: DatasetSpec) -> DataFrame:
    """Select the declared columns in declared order and types (extra columns are dropped)."""
    cols = []
    present = set(df.columns)
    for f in spec.schema.fields:
        if f.name in present:
            cols.append(F.col(f.name).cast(f.dataType).alias(f.name))
        else:
            # not F.lit(None): in PySpark 4 lit imports pandas and pyarrow into the driver
            cols.append(F.expr("NULL").cast(f.dataType).alias(f.name))
    return df.select(*cols)


def partition_dirs_beside_sidecars(path: str) -> list[str] | None:
    """The `col=value` folders of a dataset folder that also holds other, non-Spark folders.

    clip_score writes clip-retrieval's `img_emb/`, `text_emb/` and `metadata/` inside its output
    folder (contract 3); Spark's partition discovery would reject that mix ("conflicting directory
    structures"), so such a dataset is read from its partition folders with `basePath`.
    Returns None for an ordinary dataset folder (read as is).
    """
    fs, root = fsio.filesystem(path)
    try:
        entries = fs.ls(root, detail=True)
    except Exception:  # noqa: BLE001 - not a folder (a file or a glob): Spark reads it as given
        return None
    dirs = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
    visible = [d for d in dirs if not d.startswith(("_", "."))]
    partitions = [d for d in visible if "=" in d]
    if not partitions or len(partitions) == len(visible):
        return None
    return [fsio.join(path, d) for d in sorted(partitions)]


def _read_parquet(spark: SparkSession, path: str) -> DataFrame:
    parts = partition_dirs_beside_sidecars(path)
    if parts is None:
        return _analyzed(spark.read.parquet(path))
    return _analyzed(spark.read.option("basePath", path).parquet(*parts))


def _analyzed(df: DataFrame) -> DataFrame:
    """Spark Connect analyses a read lazily, so a missing, empty or corrupt input would only fail
    at the first action; asking for the schema makes it fail here, as a classic session does."""
    df.schema  # noqa: B018 - the call is the point
    return df


def spark_paths(pattern: str, storage_options: dict | None = None) -> list[str]:
    """What to hand Spark for a glob of parquet files; [] when nothing matches.

    A plain local glob is expanded to its files (given a glob, Spark logs a stack trace while it
    looks for a streaming metadata folder). A URI (s3://, s3a://, gs://, dbfs:/) is passed in the
    user's own spelling: fsio's fsspec spelling (s3a -> s3, dbfs:/ -> /dbfs/) may mean another
    filesystem, or another path, to the cluster's Spark."""
    matches = fsio.expand([pattern], storage_options)
    if fsio.normalize_uri(pattern) != pattern or fsio.is_remote(pattern):
        return [pattern] if matches else []
    return matches


def read_dataset(spark: SparkSession, path: str, spec: DatasetSpec) -> DataFrame:
    """Read a parquet dataset and check it against `spec`.

    `path` is a folder or a glob of files (e.g. download's `<images>/*.parquet`). A missing path,
    an unreadable (corrupt) file or a schema mismatch raises InputError with a clear message. A folder with no
    data files is an empty input: it yields an empty DataFrame of the declared schema (the stage
    then writes empty outputs and stats saying 0 rows) rather than Spark's "unable to infer schema".
    """
    is_glob = any(ch in path for ch in "*?[")
    files = spark_paths(path) if is_glob else []
    if not (files if is_glob else fsio.exists(path)):
        raise InputError(f"input dataset '{spec.name}' not found at {path}")
    try:
        df = _analyzed(spark.read.parquet(*files)) if is_glob else _read_parquet(spark, path)
    except Exception as exc:  # noqa: BLE001 - Spark raises AnalysisException subclasses
        message = str(exc)
        if _no_data(exc):
            log.warning("input %s has no parquet data: treating it as empty", path)
            return spark.createDataFrame([], spec.schema)
        raise InputError(f"cannot read input dataset '{spec.name}' at {path}: "
                         f"{message.splitlines()[0]}") from exc
    check_schema(df, spec, path)
    return df


def write_dataset(df: DataFrame, path: str, spec: DatasetSpec, mode: str = "overwrite") -> None:
    """Write `df` conformed to `spec`, partitioned as declared."""
    out = conform(df, spec)
    writer = out.write.mode(mode).option("compression", "zstd")
    if spec.partition_by:
        writer = writer.partitionBy(*spec.partition_by)
    writer.parquet(path)


def _no_data(exc: Exception) -> bool:
    """Spark's way of saying a folder holds no parquet files (an output with no rows)."""
    message = str(exc)
    return "UNABLE_TO_INFER_SCHEMA" in message or "Unable to infer schema" in message


def grouped_counts(spark: SparkSession, path: str, *columns: str) -> dict[tuple, int]:
    """{(values of columns): rows} of a written dataset, in one Spark job.

    A missing or row-less dataset counts as empty; any other read error is raised, because stats
    that said 0 would mark a broken output complete."""
    if not fsio.exists(path):
        return {}
    try:
        df = _read_parquet(spark, path)
    except Exception as exc:  # noqa: BLE001 - Spark raises AnalysisException subclasses
        if _no_data(exc):
            return {}
        raise
    present = [c for c in columns if c in df.columns]
    if len(present) < len(columns):
        return {("_all",): df.count()}
    return {tuple(r[c] for c in columns): int(r["n"])
            for r in df.groupBy(*columns).agg(F.count("*").alias("n")).collect()}


def count_by(spark: SparkSession, path: str, column: str = "status") -> dict[str, int]:
    """Counts by one column, read back from written data (see grouped_counts)."""
    return {str(key[0]): n for key, n in grouped_counts(spark, path, column).items()}


def footer_counts(path: str, column: str, storage_options: dict | None = None,
                  threads: int = 16) -> dict[str, int]:
    """Rows per value of the partition column `column` of a written dataset, from the parquet
    footers of its files (no Spark job, no scan of the data; the driver reads one footer per file,
    `threads` at a time). Only files under `column=value/` folders count, as Spark reads them;
    hidden files (`_`, `.`) are skipped. A missing dataset counts as empty. A null partition value
    counts under "None", as count_by reports it."""
    import posixpath
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import unquote

    import pyarrow.parquet as pq

    fs, root = fsio.filesystem(path, storage_options)
    if not fs.exists(root):
        return {}
    prefix = column + "="
    files = []
    for name in fs.find(root):
        rel = posixpath.relpath(name, root).split("/")
        if len(rel) == 2 and rel[0].startswith(prefix) and rel[1].endswith(".parquet") \
                and not rel[1].startswith(("_", ".")):
            value = unquote(rel[0][len(prefix):])
            files.append(("None" if value == "__HIVE_DEFAULT_PARTITION__" else value, name))

    def rows(name: str) -> int:
        with fs.open(name, "rb") as fh:
            return pq.read_metadata(fh).num_rows
    counts: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        for (value, _), n in zip(files, pool.map(rows, [f for _, f in files])):
            counts[value] = counts.get(value, 0) + n
    return {k: n for k, n in counts.items() if n}


def write_stats(output: str, stage: str, stats: dict[str, Any], name: str = STATS_FILE,
                storage_options: dict | None = None) -> str:
    """Write the stage's stats JSON under `<output>/_stats/`. Written last: its presence marks the
    stage's output as complete (see `is_complete`)."""
    body = {"stage": stage, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **stats}
    target = stats_path(output, name)
    fsio.write_json(target, body, storage_options)
    log.info("stats written to %s", target)
    return target


def read_stats(output: str, name: str = STATS_FILE, storage_options: dict | None = None) -> dict:
    return fsio.read_json(stats_path(output, name), storage_options)


def is_complete(output: str, storage_options: dict | None = None) -> bool:
    return fsio.exists(stats_path(output), storage_options)


class StageTimer:
    """Wall-clock seconds per named phase of a stage, for the stats JSON."""

    def __init__(self):
        self.started = time.time()
        self.phases: dict[str, float] = {}

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.time()
                log.info("%s ...", name)

            def __exit__(self, *exc):
                timer.phases[name] = round(timer.phases.get(name, 0.0) + time.time() - self.t0, 3)
                log.info("%s done in %.1fs", name, time.time() - self.t0)

        return _Phase()

    def summary(self) -> dict[str, Any]:
        return {"seconds": round(time.time() - self.started, 3), "phase_seconds": dict(self.phases)}


def write_embeddings(subset_df, root: str, rows: int, settings: dict) -> None:
    """clip-retrieval layout for one subset: ceil(rows / embeddings_per_file) parts, rows hashed by
    uid and sorted within a part, so a retried task rewrites the same files with the same rows."""
    from udfs.filter.subset_filter import parts_for

    storage_options = settings["storage_options"]
    fsio.remove(root, storage_options)   # stale parts of an earlier run must not mix with this one
    if not rows:
        return
    parts = parts_for(rows, settings["embeddings_per_file"])

    def write_part(batches):
        import pandas as pd
        from pyspark import TaskContext

        from udfs.filter.subset_filter import write_embedding_part

        frames = list(batches)
        pdf = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        part = TaskContext.get().partitionId()
        n = write_embedding_part(root, part, pdf, storage_options)
        yield pd.DataFrame({"part": [part], "rows": [n]})

    (subset_df.repartition(parts, "uid").sortWithinPartitions("uid")
     .mapInPandas(write_part, "part int, rows long").collect())


def similarity_histogram(df, column: str, hist: dict) -> list[int]:
    """Counts per bin [min + k*width, min + (k+1)*width) (values outside are clamped to the end
    bins). The bin position is rounded to 1e-9 first, so a value on an edge such as 0.26 lands in
    the bin it starts, not the one below through floating-point error."""
    from pyspark.sql import functions as F

    lo, hi, bins = float(hist["min"]), float(hist["max"]), int(hist["bins"])
    width = (hi - lo) / bins
    b = F.floor(F.round((F.col(column) - F.lit(lo)) / F.lit(width), 9)).cast("int")
    b = F.least(F.greatest(b, F.lit(0)), F.lit(bins - 1))
    counts = [0] * bins
    for r in df.where(F.col(column).isNotNull()).groupBy(b.alias("b")).count().collect():
        counts[r["b"]] += int(r["count"])
    return counts


def resolve_subset(dataset: str, subset: str, filter_dir: str = "dataset", storage_options=None) -> str:
    """A subset's folder: <dataset>/<subset> (a filter output), <dataset>/<filter_dir>/<subset> (a
    `clipcrawl run` root), or <dataset> itself (a subset folder)."""
    candidates = [fsio.join(dataset, subset), fsio.join(dataset, filter_dir, subset)]
    for path in candidates:
        if fsio.exists(path, storage_options):
            return path
    not_a_subset = [fsio.join(dataset, STATS_DIR), fsio.join(dataset, "_run")]
    if not fsio.exists(dataset, storage_options) or any(fsio.exists(p, storage_options) for p in not_a_subset):
        # nothing there, or a filter output / run root without this subset
        raise InputError(f"subset {subset!r} not found: looked for {', '.join(candidates)}")
    return dataset
