"""Keep the pairs CLIP agrees on and split them by caption language, as LAION-5B did.

Reads the clip_score output (`<scored>`, contract 3) and writes under `<dataset>`:
  laion2B-en/, laion2B-multi/, laion1B-nolang/   parquet subsets with LAION's columns (SAMPLE_ID,
      URL, TEXT, HEIGHT, WIDTH, similarity, LANGUAGE, punsafe, pwatermark, hash, key, tar_path),
      flat parquet sorted by LANGUAGE within each file (names from filter.subsets)
  embeddings/<subset>/{img_emb,text_emb,metadata}/   clip-retrieval layout, row-aligned, for build-index
  _stats/stats.json   counts per subset, language counts, rejected by reason, similarity histograms
and every row not kept in `<dataset>_rejected` (status below_threshold / not_scored / the earlier
status), so kept + rejected == input rows.

Language: filter.language_detector (default hybrid; see udfs/langid.py for the measured choice);
a caption whose confidence is below filter.min_language_confidence (null: the detector's tuned
cut-off) is "no language". Every scored row keeps LANGUAGE and language_confidence (rejected rows
too), and the stats name the detector and the cut-off applied, so a split can be redone offline.
Thresholds: filter.thresholds (LAION-5B: 0.28 en / 0.26 multi / 0.26 nolang), or all three from
filter.presets when filter.preset is set (laion400m: 0.30). Kept when score >= threshold.
English is scored with `similarity`, other buckets with `similarity_multilingual` when present.
Safety: punsafe / pwatermark from the heads at filter.punsafe_head / filter.pwatermark_head
(udfs/safety_heads.py), null when none is configured.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/filter.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from spark_jobs import cli, datasets  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.schemas import FILTER_INPUT, FILTER_REJECTED, SUBSET  # noqa: E402
from udfs import embeddings, fsio  # noqa: E402

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
    from udfs.subset_filter import BUCKETS

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
    from udfs import langid, safety_heads
    from udfs.subset_filter import BUCKETS

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
                                           else f"{detector.name} default (udfs.langid.DEFAULT_CUTOFFS)"),
        "languages": list(section["languages"]) if section.get("languages") else None,
        "punsafe_head": section.get("punsafe_head"),
        "pwatermark_head": section.get("pwatermark_head"),
        "head_dims": {k: h.input_dim for k, h in heads.items() if h is not None},
        "storage_options": storage_options,
        "subsets": dict(subsets),
        "embeddings_per_file": int(section["embeddings_per_file"]),
        "histogram": dict(section["histogram"]),
    }


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
    """Every input row with its decision (udfs.subset_filter.annotate per Arrow batch)."""
    from pyspark.sql import functions as F

    worker_settings = {k: v for k, v in settings.items() if k != "histogram"}
    optional = {"original_width": "int", "original_height": "int", "width": "int", "height": "int",
                "error_message": "string", "similarity_multilingual": "double", "tar_path": "string"}
    for col, kind in optional.items():
        if col not in df.columns:
            df = df.withColumn(col, F.lit(None).cast(kind))

    def run_batches(batches):
        from udfs.subset_filter import annotate as annotate_batch

        for pdf in batches:
            yield annotate_batch(pdf, worker_settings)

    return df.mapInPandas(run_batches, _annotated_schema())


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
    from udfs.subset_filter import parts_for

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

        from udfs.subset_filter import write_embedding_part

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
    annotated = annotate(df, settings).persist(StorageLevel.MEMORY_AND_DISK)
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
    with timer.phase("stats"):
        stats = summarize(spark, output, rejected, settings, input_rows)
    stats.update(input=args.input, rejected_output=rejected, **timer.summary())
    datasets.write_stats(output, NAME, stats, storage_options=settings["storage_options"])
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
