"""Spark column twins of udfs rules, for the stages: the same rule evaluated in the JVM.

A rule whose Python form lives in udfs/ and that a stage also needs over DataFrames (so the rows
stay in the JVM, or a udfs function runs per Arrow batch) is written here once, not inside a stage
(tests/test_dedup.py checks the key columns against udfs/dedup/dedup_keys.py):
- dedup keys (udfs/dedup/dedup_keys.py): url and pair keys, their digests and Bloom shard;
- shard partitioning: one Bloom shard per task;
- the Bloom probes of udfs/dedup/probe.py as iterator Arrow UDF columns, and the key rank;
- image dedup layers (udfs/image_dedup/layers.py: which copy is kept, pHash bands): exact and near
  duplicates as DataFrames, with connected components by min-label propagation; the filter
  stage's eval-set overlap and SemDeDup;
- the filter decision (udfs/filter/subset_filter.py) per Arrow batch;
- download's shard plan: rows ranked into shards (keys: udfs/download/download_worker.py), the
  same ranks in every run;
- export's order: the seeded sort key and its buckets (udfs/export/order.py).
Only DataFrame APIs that Spark Connect also has.
"""

from __future__ import annotations

import logging
import uuid
from typing import Callable

from spark_jobs import datasets
from udfs import fsio
from udfs.clip import embeddings
from udfs.dedup import dedup_keys
from udfs.dedup.bloom import HASH_SCHEME_SHA256_DOUBLE, HASH_SCHEME_XXH64_PAIR
from udfs.dedup.bloom_store import ShardPlan
from udfs.dedup.probe import add_keys_fn, probe_failed, probe_seen
from udfs.export import order as export_order_rules
from udfs.image_dedup.layers import band_layout

log = logging.getLogger(__name__)

# -- dedup keys in the JVM (the same rules as udfs/dedup/dedup_keys.py; tests check they agree) --

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


# Tie-break order of the representative of a key (after record_date).
REPRESENTATIVE_ORDER = ("record_date", "uid", "source_file", "record_id", "page_url", "url", "text")


def with_failed_flag(spark, df, plan: ShardPlan, out: str = "_failed"):
    """`out` = the url is probably in the failed-URL filter `plan` (its own shards and scheme)."""
    from pyspark.sql import functions as F

    n, scheme = plan.shard_count, plan.hash_scheme
    df = with_key_digest(df, "url", None, "_url_digest", "_url_shard", n, scheme)
    url_cols = digest_columns("_url_digest", scheme)
    df = shard_partitioning(spark, df, "_url_shard", "_url_part", n)
    df = df.withColumn(out, probe_column(probe_failed, plan, F.col("_url_shard"), *[F.col(c) for c in url_cols]))
    return df.drop(*url_cols, "_url_shard", "_url_part")


def ranked_by_key(spark, df, digest_cols: list[str], shards: int):
    """`_rank` (1 = the key's representative, by REPRESENTATIVE_ORDER) and `_kept_uid` per row.

    One shuffle: partition i = shard i; the window's (digest, part) clustering is then already
    satisfied (part <-> shard is one-to-one), and the Bloom probe sees one shard per task. The
    digest comes first in the window's sort: its 8-byte prefix settles nearly every comparison
    (`_part` first, constant in a partition, left every comparison to the full row comparator)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = [F.col(c).asc_nulls_last() for c in REPRESENTATIVE_ORDER]
    w = Window.partitionBy(*digest_cols, "_part").orderBy(*order)
    return (shard_partitioning(spark, df, "_shard", "_part", shards)
            .withColumn("_rank", F.row_number().over(w))
            .withColumn("_kept_uid", F.first("uid").over(w)))


def with_seen_flag(df, plan: ShardPlan, digest_cols: list[str], candidate, out: str = "_seen"):
    """`out` = a candidate row's pair key is probably in the seen filter; the other candidates'
    keys are added to the shard's next generation (rows partitioned by ranked_by_key)."""
    from pyspark.sql import functions as F

    return df.withColumn(out, probe_column(probe_seen, plan, F.col("_shard"),
                                           *[F.col(c) for c in digest_cols], candidate))


def add_url_keys(spark, urls, plan: ShardPlan) -> list:
    """Add the url keys of `urls` to the filter `plan` (its next generation); rows of
    (shard, keys_in, keys_new), one per shard touched."""
    from pyspark.sql import types as T

    n, scheme = plan.shard_count, plan.hash_scheme
    keyed = with_key_digest(urls, "url", None, "_digest", "_shard", n, scheme)
    cols = digest_columns("_digest", scheme)
    keyed = shard_partitioning(spark, keyed.select("_shard", *cols), "_shard", "_part", n)
    out_schema = T.StructType([T.StructField("shard", T.IntegerType()),
                               T.StructField("keys_in", T.LongType()),
                               T.StructField("keys_new", T.LongType())])
    return keyed.mapInArrow(add_keys_fn(plan, cols), out_schema).collect()


# -- image dedup layers (the rules of udfs/image_dedup/layers.py over DataFrames) -----------------

def exact_duplicates(rows):
    """(key, kept uid, kept key, message) of every success row whose sha256 an earlier row has."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("sha256").orderBy(F.col("record_date").asc_nulls_last(),
                                             F.col("uid").asc_nulls_last(), F.col("key"))
    ranked = (rows.where(F.col("sha256").isNotNull())
              .select("key", "sha256", F.first("uid").over(w).alias("kept_uid"),
                      F.first("key").over(w).alias("kept_key")))
    return (ranked.where(F.col("key") != F.col("kept_key"))
            .select("key", "kept_uid", "kept_key",
                    F.format_string("same sha256 %s as kept uid %s (key %s)", F.substring("sha256", 1, 16),
                                    "kept_uid", "kept_key").alias("message")))


GROUP_BITS = 8   # buckets of a band are verified in 2^8 groups (by the value's top bits): few, large
                 # Python calls; at 10M distinct hashes a group holds ~40k rows (~0.6 MB)


def banded_pairs(nodes, distance: int, bands: int, group_bits: int = GROUP_BITS):
    """Verified near pairs (a, b, d) with a < b, each once, without materialising candidates.

    `nodes` has `node` (long) and `phash` (long). Each row becomes `bands` rows (band, group), group =
    the top `group_bits` of the band's value; `groupBy(band, group).applyInPandas` runs
    udfs.image_dedup.layers.bucket_pairs on each group, which compares only rows sharing the whole band
    value (and a part of the other bits, pigeonhole) and emits a pair from the first band it shares.
    The shuffle is `bands` rows of 16 bytes per hash, linear in rows (a join on (band, value) shuffled
    and verified rows^2 / 2^16 candidate pairs); a group is one task's memory."""
    from pyspark.sql import functions as F

    layout = band_layout(bands)
    banded = nodes.select("node", "phash", F.explode(F.array(*[
        F.struct(F.lit(i).alias("band"),
                 F.shiftrightunsigned("phash", shift + width - min(width, group_bits))
                 .bitwiseAND(F.lit((1 << min(width, group_bits)) - 1)).alias("group"))
        for i, (shift, width) in enumerate(layout)])).alias("bg"))
    banded = banded.select("node", "phash", F.col("bg.band").alias("band"), F.col("bg.group").alias("group"))

    def verify(key, pdf):
        import pandas as pd

        from udfs.image_dedup.layers import bucket_pairs

        a, b, d = bucket_pairs(pdf["node"].to_numpy(), pdf["phash"].to_numpy(), int(key[0]), bands, distance)
        return pd.DataFrame({"a": a, "b": b, "d": d.astype("int32")})

    return banded.groupBy("band", "group").applyInPandas(verify, "a long, b long, d int")


def largest_bucket(hashes, bands: int) -> int:
    """Rows in the fullest (band, value) bucket: the join's pairs grow with its square, so a
    stage whose largest bucket keeps growing needs more bands' bits (fewer, wider bands)."""
    from pyspark.sql import functions as F

    values = hashes.select(F.explode(F.array(*[
        F.struct(F.lit(i).alias("band"),
                 F.shiftrightunsigned("phash", shift).bitwiseAND(F.lit((1 << width) - 1)).alias("value"))
        for i, (shift, width) in enumerate(band_layout(bands))])).alias("bv"))
    row = values.groupBy("bv").count().agg(F.max("count").alias("m")).collect()
    return int(row[0]["m"] or 0) if row else 0


def connected_components(edges, max_iterations: int):
    """(node, comp) for every node in `edges` (a, b): comp = the smallest node of its component.

    Min-label propagation: each round a node takes the smallest label among itself and its
    neighbours, then jumps to its label's label (pointer jumping, so chains shrink quickly);
    stops when no label changes. Each round is local-checkpointed so the plan does not grow.
    Returns (components, rounds, converged)."""
    from pyspark.sql import functions as F

    both = edges.select("a", "b").unionByName(edges.select(F.col("b").alias("a"), F.col("a").alias("b")))
    both = both.localCheckpoint()
    labels = both.groupBy(F.col("a").alias("node")).agg(
        F.least(F.min("b"), F.first("a")).alias("comp")).localCheckpoint()
    rounds = 0
    for rounds in range(1, max_iterations + 1):
        spread = (both.join(labels.withColumnRenamed("node", "b"), "b")
                  .groupBy(F.col("a").alias("node")).agg(F.min("comp").alias("nb")))
        step = (labels.join(spread, "node", "left")
                .select("node", F.least("comp", F.coalesce("nb", "comp")).alias("comp")))
        hop = step.select(F.col("node").alias("comp"), F.col("comp").alias("comp2"))
        new = (step.join(hop, "comp", "left")
               .select("node", F.least("comp", F.coalesce("comp2", "comp")).alias("comp"))).localCheckpoint()
        changed = (new.join(labels.withColumnRenamed("comp", "old"), "node")
                   .where(F.col("comp") != F.col("old")).limit(1).count())
        labels = new
        if not changed:
            return labels, rounds, True
    return labels, rounds, False


def near_duplicates(rows, distance: int, bands: int, max_iterations: int):
    """(key, kept uid, kept key, distance, message) of every near duplicate, and the layer's
    counts. `rows`: success rows not dropped by the exact layer."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    nodes = rows.where(F.col("phash").isNotNull()).select(
        "key", "uid", "record_date", "phash", "node",
        (F.coalesce("original_width", F.lit(0)).cast("long")
         * F.coalesce("original_height", F.lit(0)).cast("long")).alias("area"))
    # Rows with the very same hash (blank or template images can share one across millions of
    # rows) join the component of their smallest node directly; only distinct hashes are banded,
    # so a popular hash is one row in its buckets instead of a quadratic number of pairs.
    reps = nodes.groupBy("phash").agg(F.min("node").alias("rep"))
    same = (nodes.join(reps, "phash").where(F.col("node") != F.col("rep"))
            .select(F.col("rep").alias("a"), F.col("node").alias("b")))
    pairs = (banded_pairs(reps.select(F.col("rep").alias("node"), "phash"), distance, bands).select("a", "b")
             .unionByName(same)).persist()
    n_pairs = pairs.count()
    counts = {"pairs_verified": n_pairs, "rounds": 0, "converged": True, "components": 0,
              "largest_bucket": largest_bucket(reps.select("phash"), bands)}
    if not n_pairs:
        pairs.unpersist()
        return None, counts
    comps, rounds, converged = connected_components(pairs, max_iterations)
    pairs.unpersist()
    if not converged:
        log.warning("image-dedup: components did not converge in %d rounds (image_dedup.max_iterations); "
                    "some groups stay split, which keeps extra copies but drops nothing wrongly", rounds)
    w = Window.partitionBy("comp").orderBy(F.col("area").desc(), F.col("record_date").asc_nulls_last(),
                                           F.col("uid").asc_nulls_last(), F.col("key"))
    ranked = (nodes.join(comps, "node")
              .select("key", "phash", "comp", F.first("uid").over(w).alias("kept_uid"),
                      F.first("key").over(w).alias("kept_key"), F.first("phash").over(w).alias("kept_phash")))
    dups = (ranked.where(F.col("key") != F.col("kept_key"))
            .select("key", "kept_uid", "kept_key",
                    F.bit_count(F.col("phash").bitwiseXOR(F.col("kept_phash"))).cast("int").alias("distance"))
            .withColumn("message", F.format_string("phash distance %d to kept uid %s (key %s)",
                                                   "distance", "kept_uid", "kept_key")))
    counts.update(rounds=rounds, converged=converged, components=comps.select("comp").distinct().count())
    return dups, counts


# -- the filter stage's decision and hygiene layers ----------------------------------------------

def _annotated_schema():
    from pyspark.sql import types as T

    s, d, lg, i = T.StringType(), T.DoubleType(), T.LongType(), T.IntegerType()
    fields = [("uid", s), ("key", s), ("url", s), ("text", s), ("status", s), ("error_message", s),
              ("similarity", d), ("similarity_multilingual", d), ("score", d), ("threshold", d),
              ("bucket", s), ("LANGUAGE", s), ("language_confidence", d), ("SAMPLE_ID", lg),
              ("WIDTH", i), ("HEIGHT", i), ("punsafe", d), ("pwatermark", d),
              ("image_embedding", T.BinaryType()), ("text_embedding", T.BinaryType()), ("tar_path", s),
              ("image_offset", lg), ("image_size", lg)]
    return T.StructType([T.StructField(n, t, True) for n, t in fields])


def annotate(df, settings: dict):
    """Every input row with its decision (udfs.filter.subset_filter.annotate per Arrow batch)."""
    from pyspark.sql import functions as F

    worker_settings = {k: v for k, v in settings.items() if k != "histogram"}
    optional = {"original_width": "int", "original_height": "int", "width": "int", "height": "int",
                "error_message": "string", "similarity_multilingual": "double", "tar_path": "string",
                "image_offset": "bigint", "image_size": "bigint"}
    for col, kind in optional.items():
        if col not in df.columns:
            df = df.withColumn(col, F.lit(None).cast(kind))

    def run_batches(batches):
        from udfs.filter.subset_filter import annotate as annotate_batch

        for pdf in batches:
            yield annotate_batch(pdf, worker_settings)

    return df.mapInPandas(run_batches, _annotated_schema())


def eval_overlap(df, settings: dict):
    """(key, message) of the success rows whose image matches an eval item: pHash within
    image_dedup.phash_distance, or image-embedding cosine >= filter.eval_cosine. Every row is
    compared with every eval item (numpy per Arrow batch; the eval set is loaded once per worker),
    so nothing is missed: eval sets are small next to the crawl."""
    from pyspark.sql import functions as F

    if not settings.get("eval_images"):
        return None
    uri, so = settings["eval_images"], settings["storage_options"]
    dist, cos = settings["eval_phash_distance"], settings["eval_cosine"]
    rows = df.where((F.col("status") == F.lit("success")) & F.col("image_embedding").isNotNull())
    cols = ["key", "image_embedding"] + (["phash"] if "phash" in df.columns else [])
    token = uuid.uuid4().hex   # a worker reused by a later run reloads the eval set

    def match(batches):
        import pandas as pd

        from udfs.clip import embeddings
        from udfs.image_dedup.layers import cached_eval_set

        eval_set = cached_eval_set(uri, so, token)
        for pdf in batches:
            hashes = [None if pd.isna(h) else int(h) for h in pdf["phash"]] if "phash" in pdf else [None] * len(pdf)
            emb = embeddings.decode_rows(pdf["image_embedding"]) if eval_set.emb is not None else None
            msgs = eval_set.matches(hashes, emb, dist, cos)
            keep = [i for i, m in enumerate(msgs) if m is not None]
            yield pd.DataFrame({"key": pdf["key"].iloc[keep].tolist(), "message": [msgs[i] for i in keep]},
                               columns=["key", "message"])

    return rows.select(*cols).mapInPandas(match, "key string, message string")


def semantic_duplicates(spark, annotated, settings: dict, output: str):
    """SemDeDup of the kept rows: (key, message) of the semantic duplicates, and the layer's stats.

    Plan: a sample of the kept image embeddings (filter.semdedup.train_rows) trains a spherical
    k-means (faiss) on the driver; the centroids go to `<output>/_stats/semdedup_centroids.npy`;
    a mapInPandas assigns every kept row its nearest centroid; `groupBy(scope, cluster)
    .applyInPandas` runs udfs.image_dedup.layers.semdedup_cluster on each group (scope = the language
    bucket, or one scope for filter.semdedup.scope=global). One cluster is in one task's memory:
    at 10M rows and 1000 clusters that is ~10k x 512 floats (20 MB) per group."""
    import faiss
    import numpy as np
    from pyspark.sql import functions as F

    sd = settings["semdedup"]
    if not sd.get("enabled"):
        return None, {"enabled": False}
    kept = annotated.where(F.col("status") == F.lit("success")).select(
        "key", "uid", "bucket", "image_embedding")
    n = kept.count()
    k = max(1, min(int(sd["clusters"]), n // 4))
    info = {"enabled": True, "eps": float(sd["eps"]), "scope": sd["scope"], "rows": n, "clusters": k}
    if n < 2:
        return None, info
    train_rows = int(sd.get("train_rows") or 256000)
    sample = kept.select("image_embedding")
    if n > train_rows:
        sample = sample.sample(fraction=min(1.0, 1.2 * train_rows / n), seed=int(sd.get("seed") or 0)).limit(train_rows)
    train = embeddings.decode_rows([r["image_embedding"] for r in sample.collect()])
    km = faiss.Kmeans(train.shape[1], k, niter=20, seed=int(sd.get("seed") or 0), spherical=True,
                      max_points_per_centroid=max(1, len(train) // k + 1))
    km.train(np.ascontiguousarray(train, dtype=np.float32))
    token = uuid.uuid4().hex   # names this run's centroids: a reused worker must not keep older ones
    centroids_uri = fsio.join(output, datasets.STATS_DIR, f"semdedup_centroids_{token[:12]}.npy")
    embeddings.write_npy(centroids_uri, km.centroids, settings["storage_options"])
    so, eps, scope_global = settings["storage_options"], float(sd["eps"]), sd["scope"] == "global"

    def assign(batches):
        from udfs.image_dedup.layers import cached_centroids

        index = cached_centroids(centroids_uri, so)
        for pdf in batches:
            emb = embeddings.decode_rows(pdf["image_embedding"])
            _, nearest = index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
            pdf = pdf.assign(cluster=nearest[:, 0].astype("int32"),
                             scope="all" if scope_global else pdf["bucket"].fillna("none"))
            yield pdf[["key", "uid", "scope", "cluster", "image_embedding"]]

    def dedup(pdf):
        import pandas as pd

        from udfs.image_dedup.layers import cached_centroids, semantic_message, semdedup_cluster

        centroid = cached_centroids(centroids_uri, so).reconstruct(int(pdf["cluster"].iloc[0]))
        emb = embeddings.decode_rows(pdf["image_embedding"])
        kept_by, cosine, _ = semdedup_cluster(emb, centroid, eps)
        drop = np.flatnonzero(kept_by >= 0)
        keys, uids = pdf["key"].to_numpy(), pdf["uid"].to_numpy()
        return pd.DataFrame({"key": keys[drop],
                             "message": [semantic_message(uids[kept_by[i]], keys[kept_by[i]], cosine[i])
                                         for i in drop]}, columns=["key", "message"])

    assigned = kept.mapInPandas(assign, "key string, uid string, scope string, cluster int, image_embedding binary")
    return assigned.groupBy("scope", "cluster").applyInPandas(dedup, "key string, message string"), info


# -- download: rows ranked into shards, the same ranks in every run --------------------------------

# Rows are ranked inside buckets of their sort key's first characters, each bucket starting where
# the buckets before it end: the ranks are a function of the data alone, so the counting job and
# the download job agree whatever partitions Spark picks (a global sort's range bounds are sampled
# anew by each job). Hex keys give up to 16**3 buckets (~500k rows each for 2B rows), which
# keeps the map of bucket starts handed to Spark small.
BUCKET_CHARS = 3


def with_shard_order(df):
    """`_order` and its `_bucket` prefix: a total order, so that rank -> shard is the same in every
    run. The uid (a hash) comes first, or, for inputs without uids, Spark's xxhash64 of (url, text):
    either spreads each domain over all shards, which keeps the per-domain cap from serialising a
    shard, and neither needs a Python UDF before the sort (missing uids are computed by the shard
    task)."""
    from pyspark.sql import functions as F

    return (df.withColumn("_order", F.expr("coalesce(uid, lpad(hex(xxhash64(url, text)), 16, '0'))"))
              .withColumn("_bucket", F.expr(f"substring(_order, 1, {BUCKET_CHARS})")))


def bucket_counts(keyed) -> list[tuple[str, int]]:
    """(bucket, rows) of a with_shard_order frame, in bucket order."""
    from pyspark.sql import functions as F

    return sorted((r["_bucket"], int(r["_n"])) for r in
                  keyed.groupBy("_bucket").agg(F.count("*").alias("_n")).collect())


def coarse_buckets(counts: list[tuple[str, int]], min_buckets: int) -> tuple[int, list[tuple[str, int]]]:
    """(prefix length, counts) of the fewest leading characters that still give `min_buckets`
    buckets (the full BUCKET_CHARS when none does). Merging buckets by prefix keeps every rank:
    a prefix's rows are the rows of its buckets, in the same order. Fewer buckets make a smaller
    literal map: 3,747 entries (10,000 rows) took the fresh command 1.7 s to parse and analyse,
    256 entries 0.4 s."""
    merged: dict[str, int] = {}
    for chars in range(1, BUCKET_CHARS + 1):
        merged = {}
        for bucket, n in counts:
            merged[bucket[:chars]] = merged.get(bucket[:chars], 0) + n
        if len(merged) >= min_buckets:
            return chars, sorted(merged.items())
    return BUCKET_CHARS, sorted(merged.items())


def ranked_into_shards(keyed, counts: list[tuple[str, int]], size: int, min_buckets: int = 16 ** BUCKET_CHARS):
    """(shard, row struct with its position in the shard) of every row of a with_shard_order frame.
    Each bucket's first rank comes from the counts the driver already has (Python's str order is
    Spark's binary order of UTF-8): a literal map, so the download job does not recount. Buckets
    are merged to `min_buckets` or more (coarse_buckets): the ranks are the same either way."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    chars, counts = coarse_buckets(counts, min_buckets)
    if chars != BUCKET_CHARS:
        keyed = keyed.withColumn("_bucket", F.expr(f"substring(_order, 1, {chars})"))
    starts, first = [], 0
    for bucket, n in counts:
        starts.append(f"'{bucket.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}', {first}L")
        first += n
    start_of = f"element_at(map({', '.join(starts)}), _bucket)" if starts else "0L"
    within = Window.partitionBy("_bucket").orderBy("_order", "url", "text", "page_url")
    ranked = keyed.withColumn("_rank", F.expr(start_of) + F.row_number().over(within) - F.expr("1L"))
    return ranked.select(F.expr(f"CAST(_rank DIV {size} AS INT)").alias("shard"),
                         F.struct("uid", "url", "text", "page_url", "page_opt_out",
                                  F.expr(f"CAST(_rank % {size} AS INT)").alias("position")).alias("row"))


def not_in_shards(done: set[int]):
    """SQL condition keeping the rows of shards still to do (a string: F.lit/isin would import
    pandas into the driver)."""
    from pyspark.sql import functions as F

    if not done:
        return F.expr("true")
    return F.expr(f"NOT shard IN ({', '.join(str(s) for s in sorted(done))})")


# --- export's order ---------------------------------------------------------------------------------

def export_order(df, settings: dict, rows_hint: int | None = None):
    """Export's sort columns (the buckets of udfs/export/order.py); returns (df, bucket columns,
    order within a bucket).

    Shuffled: `_h` = xxhash64(seed, key) without its sign bit, `_bucket` = its top bits (ranges of
    the sort key, see bucket_bits), rows in a bucket by (`_h`, file, row). Subset order: the bucket
    is (parquet file, block of `_row`), rows by their row number: files in name order as Spark
    sorts strings, each file in its own order."""
    from pyspark.sql import functions as F

    if settings["shuffle"]:
        bits = export_order_rules.bucket_bits(rows_hint, _export_bucket_rows(settings))
        df = df.withColumn("_h", F.expr(f"xxhash64(CAST({int(settings['seed'])} AS BIGINT), key) "
                                        f"& 9223372036854775807"))
        df = df.withColumn("_bucket", F.expr(f"shiftrightunsigned(_h, {63 - bits})") if bits
                           else F.expr("CAST(0 AS BIGINT)"))
        return df, ["_bucket"], ["_h", "_file", "_row"]
    df = df.withColumn("_blk", F.expr(f"CAST(_row DIV {_export_bucket_rows(settings)} AS BIGINT)"))
    return df, ["_file", "_blk"], ["_row"]


def _export_bucket_rows(settings: dict) -> int:
    return export_order_rules.bucket_rows(settings["shard_size"], settings["rank_bucket_rows"])


def place_rows(spark, df, bucket_cols: list[str], buckets: dict, shard_size: int):
    """udfs/export/order.place in the JVM, for rows whose image offset download recorded: each row
    once per shard its bucket overlaps (`shard`, `_bidx`, `_offset`), with `offset` / `size` from
    image_offset / image_size and `ext` null (the shard task reads it from the member's header).
    The bucket table (one row per bucket) is broadcast to the join; it is handed over as an Arrow
    table, which the JVM reads itself (a list of rows is a Python RDD: one more job, run in Python
    workers, about 60 ms)."""
    import pyarrow as pa
    from pyspark.sql import functions as F
    from pyspark.sql import types as T
    from pyspark.sql.pandas.types import to_arrow_schema

    types = {f.name: f.dataType for f in df.schema.fields}
    table = T.StructType([*(T.StructField(c, types[c]) for c in bucket_cols),
                          *(T.StructField(c, T.LongType()) for c in ("_bidx", "_offset")),
                          *(T.StructField(c, T.IntegerType()) for c in ("_first", "_last"))])
    rows = [(*key, number, first, first // shard_size, (first + n - 1) // shard_size)
            for key, (number, first, n) in buckets.items()]
    schema = to_arrow_schema(table)
    arrow = pa.table([pa.array([r[i] for r in rows], f.type) for i, f in enumerate(schema)], schema=schema)
    return (df.join(F.broadcast(spark.createDataFrame(arrow, table)), list(bucket_cols))
            .select(*df.columns, F.expr("CAST(NULL AS STRING)").alias("ext"), F.col("image_offset").alias("offset"),
                    F.col("image_size").alias("size"), F.expr("CAST(NULL AS STRING)").alias("error_message"),
                    F.explode(F.sequence("_first", "_last")).alias("shard"), "_bidx", "_offset"))


def export_json(df, names):
    """KEY.json of an export sample, written in the JVM: the `names` columns as one JSON object,
    keys sorted, nulls kept, NaN and infinities as null (as orjson writes them), UTF-8 as is.
    One SQL expression, not a Column per field: each PySpark function call is a round trip to the
    JVM (about 0.1 s for the eleven LAION columns)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    types = {f.name: f.dataType for f in df.schema.fields}
    fields = []
    for name in sorted(names):
        col = f"`{name.replace('`', '``')}`"
        if isinstance(types[name], (T.DoubleType, T.FloatType)):
            col = f"CASE WHEN isnan({col}) OR abs({col}) = double('inf') THEN NULL ELSE {col} END"
        fields.append(f"'{name}', {col}")
    return F.expr(f"to_json(named_struct({', '.join(fields)}), map('ignoreNullFields', 'false'))")
