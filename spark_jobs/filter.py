"""Keep the pairs CLIP agrees on and split them by caption language, as LAION-5B did.

Reads the clip_score output (`<scored>`, contract 3) and writes under `<dataset>`:
  laion2B-en/, laion2B-multi/, laion1B-nolang/   parquet subsets with LAION's columns (SAMPLE_ID,
      URL, TEXT, HEIGHT, WIDTH, similarity, LANGUAGE, punsafe, pwatermark, hash, key, tar_path),
      flat parquet sorted by LANGUAGE within each file (names from filter.subsets)
  embeddings/<subset>/{img_emb,text_emb,metadata}/   clip-retrieval layout, row-aligned, for build-index
  _stats/stats.json   counts per subset, language counts, rejected by reason, similarity histograms
and every row not kept in `<dataset>_rejected` (status below_threshold / not_scored / the earlier
status), so kept + rejected == input rows.

Language: filter.language_detector (default hybrid; see udfs/filter/langid.py for the measured choice);
a caption whose confidence is below filter.min_language_confidence (null: the detector's tuned
cut-off) is "no language". Every scored row keeps LANGUAGE and language_confidence (rejected rows
too), and the stats name the detector and the cut-off applied, so a split can be redone offline.
Thresholds: filter.thresholds (LAION-5B: 0.28 en / 0.26 multi / 0.26 nolang), or all three from
filter.presets when filter.preset is set (laion400m: 0.30). Kept when score >= threshold.
English is scored with `similarity`, other buckets with `similarity_multilingual` when present.
Safety: punsafe / pwatermark from the heads at filter.punsafe_head / filter.pwatermark_head
(udfs/filter/safety_heads.py), null when none is configured.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/filter.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

from spark_jobs import cli, datasets  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.schemas import FILTER_INPUT, FILTER_REJECTED, SUBSET  # noqa: E402
from udfs import fsio  # noqa: E402
from udfs.clip import embeddings

NAME = "filter"
HELP = "CLIP-similarity threshold and language split into laion2B-en / laion2B-multi / laion1B-nolang"
EMBEDDINGS_DIR = "embeddings"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the clip_score output folder (local path or URI)")
    parser.add_argument("--output", required=True, help="the dataset folder: one subfolder per subset")
    parser.add_argument("--rejected-output", help="where rows not kept go (default: <output>_rejected)")


def resolve_thresholds(section: dict) -> dict[str, float]:
    """Per-bucket thresholds: `filter.thresholds`, or all three from `filter.presets[preset]` when
    `filter.preset` is set (a preset is an explicit choice, so it wins; `filter.thresholds` keeps
    holding the thresholds of the default run, which is what other readers of the config see)."""
    from udfs.filter.subset_filter import BUCKETS

    preset_name = section.get("preset")
    presets = section.get("presets") or {}
    if preset_name is not None:
        if preset_name not in presets:
            raise ConfigError(f"filter.preset {preset_name!r} is not in filter.presets "
                              f"({', '.join(presets) or 'none defined'})")
        source, values = f"filter.presets.{preset_name}", presets[preset_name] or {}
    else:
        source, values = "filter.thresholds", section.get("thresholds") or {}
    unknown = set(values) - set(BUCKETS)
    if unknown:
        raise ConfigError(f"{source} has unknown buckets {sorted(unknown)}; use {', '.join(BUCKETS)}")
    out = {}
    for bucket in BUCKETS:
        value = values.get(bucket)
        if value is None:
            raise ConfigError(f"{source}.{bucket} is not set")
        try:
            out[bucket] = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}.{bucket} must be a number, got {value!r}") from exc
        if not -1.0 <= out[bucket] <= 1.0:
            raise ConfigError(f"{source}.{bucket} is a cosine similarity in [-1, 1], got {value!r}")
    return out


def build_settings(cfg) -> dict:
    """Everything the worker functions need, as a small picklable dict (checked on the driver)."""
    from udfs.filter import langid, safety_heads
    from udfs.filter.subset_filter import BUCKETS

    section = cfg.section("filter")
    storage_options = cfg.get("storage.storage_options") or None
    if section.get("language_detector") not in langid.DETECTORS:
        raise ConfigError(f"filter.language_detector must be one of {', '.join(langid.DETECTORS)}, "
                          f"got {section.get('language_detector')!r}")
    try:
        # Built once here so a bad code, a missing gcld3 or a broken head fails before any task.
        detector = langid.get_detector(section["language_detector"], section.get("min_language_confidence"),
                                       section.get("languages"))
        heads = {k: safety_heads.get_head(section.get(k), storage_options)
                 for k in ("punsafe_head", "pwatermark_head")}
    except (langid.LanguageIdError, safety_heads.HeadLoadError) as exc:
        raise ConfigError(str(exc)) from exc
    subsets = section.get("subsets") or {}
    if set(subsets) != set(BUCKETS) or len(set(subsets.values())) != 3:
        raise ConfigError("filter.subsets needs three distinct names for en, multi and nolang")
    return {
        "thresholds": resolve_thresholds(section),
        "detector": section["language_detector"],
        "min_language_confidence": detector.min_confidence,
        "min_language_confidence_source": ("filter.min_language_confidence"
                                           if section.get("min_language_confidence") is not None
                                           else f"{detector.name} default (udfs.filter.langid.DEFAULT_CUTOFFS)"),
        "languages": list(section["languages"]) if section.get("languages") else None,
        "punsafe_head": section.get("punsafe_head"),
        "pwatermark_head": section.get("pwatermark_head"),
        "head_dims": {k: h.input_dim for k, h in heads.items() if h is not None},
        "storage_options": storage_options,
        "subsets": dict(subsets),
        "embeddings_per_file": int(section["embeddings_per_file"]),
        "histogram": dict(section["histogram"]),
        **hygiene_settings(cfg, storage_options),
    }


def hygiene_settings(cfg, storage_options) -> dict:
    """filter.semdedup and the eval set, checked on the driver (the eval set is loaded once here,
    so a bad folder fails before any task)."""
    from udfs.image_dedup.layers import EvalSetError, load_eval_set

    section = cfg.section("filter")
    sd = dict(section.get("semdedup") or {})
    if sd.get("scope") not in ("subset", "global"):
        raise ConfigError(f"filter.semdedup.scope must be subset or global, got {sd.get('scope')!r}")
    if not 0.0 < float(sd.get("eps", 0)) < 1.0:
        raise ConfigError(f"filter.semdedup.eps must be in (0, 1), got {sd.get('eps')!r}")
    if int(sd.get("clusters") or 0) < 1:
        raise ConfigError("filter.semdedup.clusters must be >= 1")
    eval_uri = section.get("eval_images")
    eval_items = 0
    if eval_uri:
        try:
            eval_items = len(load_eval_set(eval_uri, storage_options))
        except EvalSetError as exc:
            raise ConfigError(str(exc)) from exc
    cosine = float(section.get("eval_cosine"))
    if not -1.0 <= cosine <= 1.0:
        raise ConfigError(f"filter.eval_cosine is a cosine in [-1, 1], got {cosine}")
    return {"semdedup": sd, "eval_images": eval_uri, "eval_items": eval_items, "eval_cosine": cosine,
            "eval_phash_distance": int(cfg.get("image_dedup.phash_distance"))}


def _annotated_schema():
    from pyspark.sql import types as T

    s, d, lg, i = T.StringType(), T.DoubleType(), T.LongType(), T.IntegerType()
    fields = [("uid", s), ("key", s), ("url", s), ("text", s), ("status", s), ("error_message", s),
              ("similarity", d), ("similarity_multilingual", d), ("score", d), ("threshold", d),
              ("bucket", s), ("LANGUAGE", s), ("language_confidence", d), ("SAMPLE_ID", lg),
              ("WIDTH", i), ("HEIGHT", i), ("punsafe", d), ("pwatermark", d),
              ("image_embedding", T.BinaryType()), ("text_embedding", T.BinaryType()), ("tar_path", s)]
    return T.StructType([T.StructField(n, t, True) for n, t in fields])


def _check_head_dims(df, settings: dict) -> None:
    """A head whose input size differs from the embeddings is a config error, found on the driver."""
    from pyspark.sql import functions as F

    if not settings["head_dims"]:
        return
    row = (df.where(F.col("image_embedding").isNotNull())
           .select((F.length("image_embedding") / 2).cast("int").alias("dim")).limit(1).collect())
    if not row:
        return
    for key, dim in settings["head_dims"].items():
        if dim != row[0]["dim"]:
            raise ConfigError(f"filter.{key} expects embeddings of dimension {dim}, but the input's "
                              f"image embeddings have dimension {row[0]['dim']}")


def annotate(df, settings: dict):
    """Every input row with its decision (udfs.filter.subset_filter.annotate per Arrow batch)."""
    from pyspark.sql import functions as F

    worker_settings = {k: v for k, v in settings.items() if k != "histogram"}
    optional = {"original_width": "int", "original_height": "int", "width": "int", "height": "int",
                "error_message": "string", "similarity_multilingual": "double", "tar_path": "string"}
    for col, kind in optional.items():
        if col not in df.columns:
            df = df.withColumn(col, F.lit(None).cast(kind))

    def run_batches(batches):
        from udfs.filter.subset_filter import annotate as annotate_batch

        for pdf in batches:
            yield annotate_batch(pdf, worker_settings)

    return df.mapInPandas(run_batches, _annotated_schema())


def _mark(annotated, drops, status: str):
    """Rows of `annotated` still kept whose key is in `drops` (key, message) become `status`."""
    from pyspark.sql import functions as F

    if drops is None:
        return annotated
    joined = annotated.join(drops.select("key", F.col("message").alias("_drop")), "key", "left")
    hit = F.col("_drop").isNotNull() & (F.col("status") == F.lit("success"))
    changed = {"status": F.when(hit, F.lit(status)).otherwise(F.col("status")),
               "error_message": F.when(hit, F.col("_drop")).otherwise(F.col("error_message"))}
    return joined.select(*[changed[c].alias(c) if c in changed else F.col(c) for c in annotated.columns])


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


def _subset_frame(kept):
    from pyspark.sql import functions as F

    return kept.select(
        "SAMPLE_ID", F.col("url").alias("URL"), F.col("text").alias("TEXT"), "HEIGHT", "WIDTH",
        F.col("score").alias("similarity"), "LANGUAGE", "punsafe", "pwatermark",
        F.col("SAMPLE_ID").alias("hash"), "key", "tar_path", "language_confidence", "uid", "image_embedding",
        "text_embedding")


def write_embeddings(subset_df, root: str, rows: int, settings: dict) -> None:
    """clip-retrieval layout for one subset: ceil(rows / embeddings_per_file) parts, rows hashed by
    uid and sorted within a part, so a retried task rewrites the same files with the same rows."""
    from udfs.filter.subset_filter import parts_for

    storage_options = settings["storage_options"]
    fs, path = fsio.filesystem(root, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # stale parts of an earlier run must not mix with this one
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


def summarize(spark, output: str, rejected: str, settings: dict, input_rows: int) -> dict:
    """Stats from the written data: subsets, rejected, embeddings files."""
    from pyspark.sql import functions as F

    hist = settings["histogram"]
    subsets, languages = {}, {}
    kept_frames = []
    for bucket, name in settings["subsets"].items():
        path = fsio.join(output, name)
        counts = datasets.count_by(spark, path, "LANGUAGE")
        rows = sum(counts.values())
        emb = embeddings.check_retrieval_layout(fsio.join(output, EMBEDDINGS_DIR, name), settings["storage_options"])
        if emb["rows"] != rows:
            raise RuntimeError(f"subset {name} has {rows} rows but its embeddings layout {emb['rows']}")
        subsets[name] = {"bucket": bucket, "rows": rows, "threshold": settings["thresholds"][bucket],
                         "languages": counts, "embedding_parts": emb["parts"]}
        for lang, n in counts.items():
            key = "none" if lang == "None" else lang
            languages[key] = languages.get(key, 0) + n
        if rows:
            kept_frames.append(spark.read.parquet(path).select(F.col("similarity").alias("s")))
    rejected_by = datasets.count_by(spark, rejected, "status")
    kept = sum(s["rows"] for s in subsets.values())
    scored_frames = list(kept_frames)
    if rejected_by.get("below_threshold"):
        scored_frames.append(spark.read.parquet(rejected).where(F.col("status") == "below_threshold")
                             .select(F.col("score").alias("s")))
    union = functools.reduce(lambda a, b: a.unionByName(b), scored_frames) if scored_frames else None
    kept_union = functools.reduce(lambda a, b: a.unionByName(b), kept_frames) if kept_frames else None
    bins = int(hist["bins"])
    scored = kept + rejected_by.get("below_threshold", 0)
    stats = {
        "input_rows": input_rows,
        "kept": kept,
        "rejected": sum(rejected_by.values()),
        "rejected_by_status": rejected_by,
        "balanced": kept + sum(rejected_by.values()) == input_rows,
        "scored_rows": scored,
        "kept_fraction_of_scored": round(kept / scored, 6) if scored else None,
        "subsets": subsets,
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
        "thresholds": settings["thresholds"],
        "language_detector": settings["detector"],
        "min_language_confidence": settings["min_language_confidence"],
        "min_language_confidence_source": settings["min_language_confidence_source"],
        "safety_heads": {"punsafe": settings["punsafe_head"], "pwatermark": settings["pwatermark_head"]},
        "similarity_histogram": {
            "min": float(hist["min"]), "max": float(hist["max"]), "bins": bins,
            "bin_width": (float(hist["max"]) - float(hist["min"])) / bins,
            "scored": similarity_histogram(union, "s", hist) if union is not None else [0] * bins,
            "kept": similarity_histogram(kept_union, "s", hist) if kept_union is not None else [0] * bins,
        },
    }
    if not stats["balanced"]:
        log.error("filter: kept %d + rejected %d != input %d", kept, stats["rejected"], input_rows)
    return stats


def run(spark, cfg, args) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    timer = datasets.StageTimer()
    settings = build_settings(cfg)
    output, rejected = args.output, datasets.rejected_path(args.output, args.rejected_output)
    with timer.phase("read"):
        df = datasets.read_dataset(spark, args.input, FILTER_INPUT)
        input_rows = df.count()
        _check_head_dims(df, settings)
    log.info("filter: %d input rows; thresholds %s; language detector %s (min confidence %s)",
             input_rows, settings["thresholds"], settings["detector"], settings["min_language_confidence"])
    # The embeddings root exists even when every subset is empty, so build-index sees "no subsets"
    # rather than "not a filter output" (a no-op on object stores, which have no folders).
    fs, emb_root = fsio.filesystem(fsio.join(output, EMBEDDINGS_DIR), settings["storage_options"])
    fs.makedirs(emb_root, exist_ok=True)
    base = annotated = annotate(df, settings).persist(StorageLevel.MEMORY_AND_DISK)
    with timer.phase("eval_overlap"):
        annotated = _mark(annotated, eval_overlap(df, settings), "eval_overlap")
    with timer.phase("semdedup"):
        drops, semdedup_info = semantic_duplicates(spark, annotated, settings, output)
        annotated = _mark(annotated, drops, "semantic_duplicate")
    if annotated is not base:   # computed once: every subset and the rejected rows read it
        annotated = annotated.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with timer.phase("write_rejected"):
            datasets.write_dataset(annotated.where(F.col("status") != "success"), rejected, FILTER_REJECTED)
        kept = annotated.where(F.col("status") == "success")
        for bucket, name in settings["subsets"].items():
            sub = _subset_frame(kept.where(F.col("bucket") == bucket))
            path = fsio.join(output, name)
            with timer.phase(f"write_{bucket}"):
                datasets.write_dataset(sub.sortWithinPartitions("LANGUAGE", "SAMPLE_ID"), path, SUBSET)
            rows = sum(datasets.count_by(spark, path, "LANGUAGE").values())
            with timer.phase(f"embeddings_{bucket}"):
                write_embeddings(sub, fsio.join(output, EMBEDDINGS_DIR, name), rows, settings)
    finally:
        annotated.unpersist()
        base.unpersist()
    with timer.phase("stats"):
        stats = summarize(spark, output, rejected, settings, input_rows)
    stats["hygiene"] = {
        "eval_overlap": stats["rejected_by_status"].get("eval_overlap", 0),
        "semantic_duplicate": stats["rejected_by_status"].get("semantic_duplicate", 0),
        "eval_images": settings["eval_images"], "eval_items": settings["eval_items"],
        "eval_cosine": settings["eval_cosine"], "eval_phash_distance": settings["eval_phash_distance"],
        "semdedup": semdedup_info}
    stats.update(input=args.input, rejected_output=rejected, **timer.summary())
    datasets.write_stats(output, NAME, stats, storage_options=settings["storage_options"])
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
