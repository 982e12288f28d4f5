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
from typing import Callable, Iterator

from spark_jobs import cli, datasets
from spark_jobs.config import Config, ConfigError
from spark_jobs.schemas import DEDUP_REJECTED, WAT_PAIRS
from udfs import fsio
from udfs.dedup import dedup_keys
from udfs.dedup.bloom import HASH_SCHEME_SHA256_DOUBLE, HASH_SCHEME_XXH64_PAIR, CorruptFilterError
from udfs.dedup.bloom_store import BloomStore, Manifest, ShardPlan

NAME = "dedup"
HELP = "exact dedup of url+text, then drop pairs seen in earlier runs (sharded Bloom filter)"

log = logging.getLogger(__name__)

DUPLICATE, SEEN_BEFORE, FAILED_BEFORE = "duplicate", "seen_before", "failed_before"
PAIR_KEYS, URL_KEYS = "pair", "url"
# Tie-break order of the representative of a key (after record_date).
REPRESENTATIVE_ORDER = ("record_date", "uid", "source_file", "record_id", "page_url", "url", "text")


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


# -- keys in the JVM (the same rules as udfs/dedup/dedup_keys.py; tests check they agree) ---------------

def _ascii_lower(col):
    from pyspark.sql import functions as F
    return F.translate(col, dedup_keys._UPPER, dedup_keys._LOWER)


def _url_stripped(url):
    """Surrounding whitespace and the fragment removed (plain string functions, no regex)."""
    from pyspark.sql import functions as F
    u = F.trim(F.coalesce(url, F.lit("")), F.lit(dedup_keys.WHITESPACE_CHARS))
    return F.substring_index(u, "#", 1)


def _authority_prefix(u):
    from pyspark.sql import functions as F
    return F.regexp_extract(u, dedup_keys.AUTHORITY_PREFIX, 0)


def _url_rebuilt(u, prefix):
    """Scheme and host lower-cased. u: the stripped url; prefix: its `scheme://authority` ("" if
    none). Without user-info (nearly always) that is one lower-casing of the prefix; with
    user-info, the full pattern splits it off so it keeps its case."""
    from pyspark.sql import functions as F
    pattern = "(?s)^" + dedup_keys.URL_PATTERN + "$"
    parts = [F.regexp_extract(u, pattern, i) for i in (1, 2, 3, 4)]
    with_userinfo = F.concat(_ascii_lower(parts[0]), parts[1], _ascii_lower(parts[2]), parts[3])
    plain = F.concat(_ascii_lower(prefix), u.substr(F.length(prefix) + 1, F.length(u)))
    return (F.when(prefix == "", u)
             .when(F.instr(prefix, "@") > 0, with_userinfo)
             .otherwise(plain))


def url_key_column(url):
    """udfs.dedup.dedup_keys.url_key as a Spark expression."""
    u = _url_stripped(url)
    return _url_rebuilt(u, _authority_prefix(u))


def text_key_column(text):
    """Every whitespace character -> space (translate, no regex), runs of spaces -> one (a regex
    only when the text holds a double space), ends trimmed: the same as dedup_keys.normalize_text."""
    return _text_collapsed(_text_spaces(text))


def _text_spaces(text):
    from pyspark.sql import functions as F
    others = dedup_keys.WHITESPACE_CHARS.replace(" ", "")
    return F.translate(F.coalesce(text, F.lit("")), others, " " * len(others))


def _text_collapsed(t):
    from pyspark.sql import functions as F
    return F.trim(F.when(F.instr(t, "  ") > 0, F.regexp_replace(t, " {2,}", " ")).otherwise(t))


def pair_key_column(url, text):
    """udfs.dedup.dedup_keys.pair_key as a Spark expression."""
    from pyspark.sql import functions as F
    return F.concat(url_key_column(url), F.lit("\t"), text_key_column(text))


def digest_columns(digest_col: str, scheme: int) -> list[str]:
    """The columns with_key_digest writes for a digest: one binary (SHA-256) or two longs (XXH64)."""
    return [digest_col] if scheme == HASH_SCHEME_SHA256_DOUBLE else [digest_col, f"{digest_col}_b"]


def with_key_digest(df, url: str, text: str | None, digest_col: str, shard_col: str, shards: int,
                    scheme: int = HASH_SCHEME_SHA256_DOUBLE):
    """Add the digest of the pair key (or of the URL key when `text` is None) and its shard
    (bloom.shard_of, in the JVM). Scheme 1: `digest_col` = SHA-256 (binary); scheme 2: `digest_col`
    and `<digest_col>_b` = xxhash64 and xxhash64(lit(1), key) (longs; about 4x cheaper to compute,
    and cheaper to partition and sort by than a 32-byte binary). Built in steps on temporary
    columns: Spark does not collapse projections that would repeat a costly expression, so each
    regex runs once per row."""
    from pyspark.sql import functions as F
    tmp_u, tmp_p, tmp_t = f"{digest_col}__u", f"{digest_col}__p", f"{digest_col}__t"
    tmp_k, tmp_h = f"{digest_col}__k", f"{digest_col}__h"
    df = df.withColumn(tmp_u, _url_stripped(F.col(url)))
    df = df.withColumn(tmp_p, _authority_prefix(F.col(tmp_u)))
    key = _url_rebuilt(F.col(tmp_u), F.col(tmp_p))
    if text is not None:
        df = df.withColumn(tmp_t, _text_spaces(F.col(text)))
        key = F.concat(key, F.lit("\t"), _text_collapsed(F.col(tmp_t)))
    df = df.withColumn(tmp_k, key)
    if scheme == HASH_SCHEME_XXH64_PAIR:
        a, b = digest_columns(digest_col, scheme)
        df = df.withColumn(a, F.xxhash64(F.col(tmp_k))).withColumn(b, F.xxhash64(F.lit(1), F.col(tmp_k)))
        return (df.withColumn(shard_col, F.pmod(F.shiftrightunsigned(F.col(a), 32),
                                                F.lit(int(shards))).cast("int"))
                  .drop(tmp_u, tmp_p, tmp_t, tmp_k))
    if scheme != HASH_SCHEME_SHA256_DOUBLE:
        raise ValueError(f"unknown hash scheme {scheme}")
    df = df.withColumn(tmp_h, F.sha2(F.col(tmp_k), 256))
    return (df.withColumn(digest_col, F.unhex(F.col(tmp_h)))
              .withColumn(shard_col, F.pmod(F.conv(F.substring(F.col(tmp_h), 1, 8), 16, 10).cast("long"),
                                            F.lit(int(shards))).cast("int"))
              .drop(tmp_u, tmp_p, tmp_t, tmp_k, tmp_h))


def shard_partitioning(spark, df, shard_col: str, part_col: str, shards: int):
    """Repartition so that partition i holds exactly the rows of shard i.

    `repartition(n, shard)` would hash the shard number, leaving some partitions with two or three
    shards and others empty. Spark's hash partitioning is pmod(hash(col), n), so for each shard we
    pick a long whose hash lands in that shard's partition (a tiny driver-side search) and
    partition by that value instead: one shard per task, balanced, and the downstream window on
    (part_col, digest) needs no further shuffle."""
    from pyspark.sql import functions as F
    found: dict[int, int] = {}
    span = 64 * shards
    start = 0
    while len(found) < shards:
        rows = (spark.range(start, start + span)
                .select(F.pmod(F.hash("id"), F.lit(shards)).alias("p"), F.col("id"))
                .groupBy("p").agg(F.min("id").alias("v")).collect())
        for r in rows:
            found.setdefault(int(r["p"]), int(r["v"]))
        start += span
        if start > 10_000 * shards:
            raise RuntimeError(f"no hash-partition value found for {shards - len(found)} shards")
    values = F.array(*[F.lit(found[s]).cast("long") for s in range(shards)])
    return (df.withColumn(part_col, F.element_at(values, F.col(shard_col) + 1))
              .repartition(shards, part_col))


# -- task-side functions (no Spark objects inside: they run in Python workers) --------------------

def _digest_words(arrays, scheme: int = HASH_SCHEME_SHA256_DOUBLE):
    """Digest words (bloom.digests layout) of the Arrow digest column(s) of a batch, without a
    Python loop: (n, 4) from one binary column of 32-byte SHA-256 digests, (n, 2) from two xxhash64
    long columns."""
    import numpy as np
    import pyarrow as pa

    from udfs.dedup.bloom import digests_from_bytes, digests_from_longs
    if scheme == HASH_SCHEME_XXH64_PAIR:
        a, b = arrays
        return digests_from_longs(a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False))
    (arr,) = arrays
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    if data.size != 32 * len(arr):
        raise ValueError("digest column does not hold 32-byte values")
    return digests_from_bytes(data)


def _shard_runs(shards) -> Iterator[tuple[int, int, int]]:
    """(shard, start, stop) for runs of equal shard in a batch (a partition holds one shard, so
    normally one run; the cursor refuses a shard that comes back after another)."""
    import numpy as np
    if len(shards) == 0:
        return
    cuts = np.flatnonzero(np.diff(shards)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(shards)]])
    for a, b in zip(starts, stops):
        yield int(shards[a]), int(a), int(b)


class _ShardCursor:
    """Walks the shards of one partition in order, loading one shard at a time. A shard that
    shows up again after the cursor moved on is a bug in the plan (see shard_partitioning)."""

    def __init__(self, plan: ShardPlan, writable: bool):
        self.plan, self.writable = plan, writable
        self.shard: int | None = None
        self.old = self.new = None
        self.added = 0
        self.done: set[int] = set()

    def move_to(self, shard: int):
        if shard == self.shard:
            return
        self.finish()
        if shard in self.done:
            raise RuntimeError(f"rows of shard {shard} are not contiguous in the partition")
        self.shard, self.old, self.new, self.added = shard, self.plan.load(shard), None, 0

    def add(self, words):
        if len(words) == 0:
            return
        if self.new is None:
            self.new = self.old.copy()  # test against the old bits only: order-independent result
        self.added += self.new.add_digests(words)

    def finish(self):
        if self.shard is None:
            return
        self.old = None  # free the old bits before the file image is built: peak stays ~2 shards
        if self.writable and self.new is not None and self.added:
            self.plan.write(self.new)
        self.done.add(self.shard)
        self.shard = self.old = self.new = None


def probe_seen(plan: ShardPlan, batches) -> Iterator:
    """The seen-filter probe over key batches only: (shards, digest column(s) of the plan's hash
    scheme, candidate) Arrow arrays in, one bool numpy array (`_seen`) out per batch. Candidates
    (representative, not failed) whose key the shard probably holds are seen; the other candidates
    are added to the shard's new bits, which are written when the partition ends."""
    import numpy as np
    cursor = _ShardCursor(plan, writable=True)
    for shard_arr, *digest_arrs, cand_arr in batches:
        n = len(shard_arr)
        seen = np.zeros(n, dtype=bool)
        if n:
            shards = shard_arr.to_numpy(zero_copy_only=False)
            candidate = cand_arr.to_numpy(zero_copy_only=False).astype(bool)
            words = _digest_words(digest_arrs, plan.hash_scheme)
            for shard, a, b in _shard_runs(shards):
                cursor.move_to(shard)
                idx = a + np.flatnonzero(candidate[a:b])
                hit = cursor.old.contains_digests(words[idx])
                seen[idx[hit]] = True
                cursor.add(words[idx[~hit]])
        yield seen
    cursor.finish()


def probe_failed(plan: ShardPlan, batches) -> Iterator:
    """The failed-URL probe over key batches only: (url shards, url digest column(s)) in, `_failed` out."""
    import numpy as np
    cursor = _ShardCursor(plan, writable=False)
    for shard_arr, *digest_arrs in batches:
        failed = np.zeros(len(shard_arr), dtype=bool)
        if len(shard_arr):
            shards = shard_arr.to_numpy(zero_copy_only=False)
            words = _digest_words(digest_arrs, plan.hash_scheme)
            for shard, a, b in _shard_runs(shards):
                cursor.move_to(shard)
                failed[a:b] = cursor.old.contains_digests(words[a:b])
        yield failed


def probe_column(probe: Callable, plan: ShardPlan, *cols):
    """A bool column computed by `probe` in an iterator Arrow UDF: only the key columns travel to
    Python (the rows stay in the JVM and are zipped with the result there), and the iterator spans
    the whole partition, so a shard is loaded once and written once at its end. Nondeterministic:
    the optimizer must neither duplicate nor move it (it writes the shard's next generation)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def fn(batches):
        import pyarrow as pa
        for out in probe(plan, batches):
            yield pa.array(out, pa.bool_())
    udf = F.arrow_udf(fn, T.BooleanType(), F.ArrowUDFType.SCALAR_ITER).asNondeterministic()
    return udf(*cols)


def add_keys_fn(plan: ShardPlan, digest_cols: list[str]) -> Callable:
    """mapInArrow function for --add-failed: add every key, write the touched shards, and emit
    one row per shard (shard, keys_in, keys_new)."""
    def fn(batches):
        import pyarrow as pa
        cursor = _ShardCursor(plan, writable=True)
        counts: dict[int, list[int]] = {}
        for batch in batches:
            if not batch.num_rows:
                continue
            shards = batch.column("_shard").to_numpy(zero_copy_only=False)
            words = _digest_words([batch.column(c) for c in digest_cols], plan.hash_scheme)
            for shard, a, b in _shard_runs(shards):
                cursor.move_to(shard)
                before = cursor.added
                cursor.add(words[a:b])
                c = counts.setdefault(shard, [0, 0])
                c[0] += b - a
                c[1] += cursor.added - before
        cursor.finish()
        if counts:
            yield pa.RecordBatch.from_pydict({
                "shard": pa.array(list(counts), pa.int32()),
                "keys_in": pa.array([c[0] for c in counts.values()], pa.int64()),
                "keys_new": pa.array([c[1] for c in counts.values()], pa.int64())})
    return fn


# -- driver side ---------------------------------------------------------------------------------

class FilterState:
    """One filter store as this run sees it: what it reads, and what it will write."""

    def __init__(self, role: str, uri: str, store: BloomStore, read: Manifest | None,
                 plan: ShardPlan, fresh_start_reason: str | None, resumed: bool):
        self.role, self.uri, self.store, self.read = role, uri, store, read
        self.plan, self.fresh_start_reason, self.resumed = plan, fresh_start_reason, resumed
        self.written: Manifest | None = None

    def stats(self) -> dict:
        out = {"uri": self.uri, "generation_read": self.read.generation if self.read else None,
               "generation_written": self.written.generation if self.written else None,
               "shards": self.plan.shard_count, "bits_per_shard": self.plan.num_bits,
               "hashes": self.plan.num_hashes, "hash_scheme": self.plan.hash_scheme,
               "fresh_start_reason": self.fresh_start_reason,
               "resumed_from_parent": self.resumed}
        final = self.written or self.read
        if final is not None:
            summary = final.summary()
            out.update({"keys": summary["keys"], "bytes": summary["bytes"],
                        "fill_ratio": round(summary["fill_ratio"], 6),
                        "estimated_false_positive_rate": summary["estimated_false_positive_rate"],
                        "configured_false_positive_rate": final.false_positive_rate})
        return out


def open_filter(role: str, uri: str, key_kind: str, conf: dict, storage_options: dict,
                shards: int, expected_keys: int, writable: bool,
                resume_run: dict | None = None) -> FilterState:
    """Open a store for this run. Damage raises InputError unless on_corrupt_filter=fresh_start.

    `resume_run` ({"input", "output"}): if CURRENT was published by a run with the same input
    and output whose stats were never written (it died after the publish), read its parent."""
    store = BloomStore(uri, key_kind, storage_options)
    mode = conf.get("on_corrupt_filter", "error")
    if mode not in ("error", "fresh_start"):
        raise ConfigError(f"dedup.on_corrupt_filter must be error or fresh_start, got {mode!r}")
    fpr = float(conf["false_positive_rate"])
    fresh_scheme = int(conf.get("hash_scheme", HASH_SCHEME_XXH64_PAIR))
    read, reason, resumed = None, None, False
    try:
        gen = store.current_generation()
        if gen is not None:
            read = store.manifest(gen)
            run = read.run or {}
            if (resume_run and run.get("input") == resume_run["input"]
                    and run.get("output") == resume_run["output"]
                    and not datasets.is_complete(resume_run["output"], storage_options)):
                log.warning("%s filter generation %d was published by an unfinished run with the "
                            "same input and output: reading its parent %s instead", role, gen, read.parent)
                resumed = True
                read = store.manifest(read.parent) if read.parent is not None else None
            if read is not None:
                store.verify(read, full=(mode == "fresh_start"))
    except CorruptFilterError as exc:
        if mode != "fresh_start":
            raise datasets.InputError(
                f"{role} filter at {uri} is unusable: {exc}. Restore it from a backup, point to "
                f"another filter, or set dedup.on_corrupt_filter=fresh_start to start an empty "
                f"filter (pairs it held are then kept again)") from exc
        log.error("%s filter at %s is unusable (%s): starting a fresh, empty filter "
                  "(dedup.on_corrupt_filter=fresh_start)", role, uri, exc)
        read, reason = None, str(exc)
    if read is not None and read.shard_count != shards:
        log.info("%s filter has %d shards (config says %d): the filter's own count is used",
                 role, read.shard_count, shards)
    # A number above every folder on disk: a fresh start never overwrites the damaged generations.
    write_gen = store.next_generation(read.generation if read else None) if writable else None
    plan = store.plan(read, write_gen, fresh=(shards, expected_keys, fpr), fresh_scheme=fresh_scheme)
    if read is not None and read.hash_scheme != fresh_scheme:
        log.info("%s filter at %s uses hash scheme %d (dedup.hash_scheme=%d applies to new filters "
                 "only): it is probed and extended with its own scheme", role, uri,
                 read.hash_scheme, fresh_scheme)
    return FilterState(role, uri, store, read, plan, reason, resumed)


def _publish(state: FilterState, conf: dict, expected_keys: int, run: dict) -> None:
    state.written = state.store.publish(state.plan, state.read.generation if state.read else None,
                                        state.read.expected_keys if state.read else expected_keys,
                                        state.read.false_positive_rate if state.read
                                        else float(conf["false_positive_rate"]), run)


def _translate_task_error(exc: Exception) -> None:
    """A shard that fails its checksum inside a task surfaces as a Spark error: make it an InputError."""
    message = str(exc)
    if "CorruptFilterError" in message:
        detail = next((line for line in message.splitlines() if "CorruptFilterError" in line), message)
        raise datasets.InputError(f"a filter shard is damaged: {detail.strip()[:500]}. Restore the "
                                  "filter or set dedup.on_corrupt_filter=fresh_start") from exc


def add_failed(spark, conf: dict, storage_options: dict, images: str, failed_uri: str) -> dict:
    """Add the URLs of non-retryable download failures to the failed-URL filter (one generation)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

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
    n, scheme = state.plan.shard_count, state.plan.hash_scheme
    keyed = with_key_digest(failed, "url", None, "_digest", "_shard", n, scheme)
    cols = digest_columns("_digest", scheme)
    keyed = shard_partitioning(spark, keyed.select("_shard", *cols), "_shard", "_part", n)
    out_schema = T.StructType([T.StructField("shard", T.IntegerType()),
                               T.StructField("keys_in", T.LongType()),
                               T.StructField("keys_new", T.LongType())])
    try:
        per_shard = keyed.mapInArrow(add_keys_fn(state.plan, cols), out_schema).collect()
    except Exception as exc:  # noqa: BLE001
        _translate_task_error(exc)
        raise
    _publish(state, conf, int(conf["failed_expected_keys"]), {"add_failed": images})
    return {"images": images, "failed_urls": sum(r["keys_in"] for r in per_shard),
            "failed_urls_new": sum(r["keys_new"] for r in per_shard), "filter": state.stats()}


def run(spark, cfg: Config, args: argparse.Namespace) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import Window
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
    digest_cols = digest_columns("_digest", scheme)
    df = datasets.conform(datasets.read_dataset(spark, args.input, WAT_PAIRS), WAT_PAIRS)
    df = with_key_digest(df, "url", "text", "_digest", "_shard", shards, scheme)

    if failed is not None and failed.read is not None:  # an empty failed-URL filter needs no pass
        fn, fscheme = failed.plan.shard_count, failed.plan.hash_scheme
        df = with_key_digest(df, "url", None, "_url_digest", "_url_shard", fn, fscheme)
        url_cols = digest_columns("_url_digest", fscheme)
        df = shard_partitioning(spark, df, "_url_shard", "_url_part", fn)
        df = df.withColumn("_failed", probe_column(probe_failed, failed.plan, F.col("_url_shard"),
                                                   *[F.col(c) for c in url_cols]))
        df = df.drop(*url_cols, "_url_shard", "_url_part")
    else:
        df = df.withColumn("_failed", F.lit(False))

    # One shuffle: partition i = shard i; the window's (digest, part) clustering is then already
    # satisfied (part <-> shard is one-to-one), and the Bloom probe sees one shard per task. The
    # digest comes first in the window's sort: its 8-byte prefix settles nearly every comparison
    # (`_part` first, constant in a partition, left every comparison to the full row comparator).
    order = [F.col(c).asc_nulls_last() for c in REPRESENTATIVE_ORDER]
    w = Window.partitionBy(*digest_cols, "_part").orderBy(*order)
    df = (shard_partitioning(spark, df, "_shard", "_part", shards)
            .withColumn("_rank", F.row_number().over(w))
            .withColumn("_kept_uid", F.first("uid").over(w)))
    if seen is not None:
        candidate = (F.col("_rank") == 1) & ~F.col("_failed")
        df = df.withColumn("_seen", probe_column(probe_seen, seen.plan, F.col("_shard"),
                                                 *[F.col(c) for c in digest_cols], candidate))
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
        with timer.phase("write"):
            datasets.write_dataset(tagged.filter(F.col("status").isNull()), output, WAT_PAIRS)
            datasets.write_dataset(tagged.filter(F.col("status").isNotNull()), rejected, DEDUP_REJECTED)
    except Exception as exc:  # noqa: BLE001
        _translate_task_error(exc)
        raise
    finally:
        del tagged

    if seen is not None:
        with timer.phase("publish"):
            _publish(seen, conf, expected_keys, this_run)

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
