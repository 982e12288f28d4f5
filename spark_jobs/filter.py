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

from spark_jobs import cli, columns, datasets  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.schemas import FILTER_INPUT, FILTER_REJECTED, SUBSET  # noqa: E402
from udfs import fsio  # noqa: E402
from udfs.clip import embeddings  # noqa: E402
from udfs.filter import settings as filter_settings  # noqa: E402

NAME = "filter"
HELP = "CLIP-similarity threshold and language split into laion2B-en / laion2B-multi / laion1B-nolang"
EMBEDDINGS_DIR = "embeddings"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the clip_score output folder (local path or URI)")
    parser.add_argument("--output", required=True, help="the dataset folder: one subfolder per subset")
    parser.add_argument("--rejected-output", help="where rows not kept go (default: <output>_rejected)")


def resolve_thresholds(section: dict) -> dict[str, float]:
    """udfs.filter.settings.resolve_thresholds, a bad setting as ConfigError."""
    try:
        return filter_settings.resolve_thresholds(section)
    except filter_settings.SettingsError as exc:
        raise ConfigError(str(exc)) from exc.__cause__


def build_settings(cfg) -> dict:
    """udfs.filter.settings.build_settings for this config, a bad setting as ConfigError."""
    try:
        return filter_settings.build_settings(cfg.section("filter"), cfg.get("storage.storage_options") or None,
                                              cfg.get("image_dedup.phash_distance"))
    except filter_settings.SettingsError as exc:
        raise ConfigError(str(exc)) from exc.__cause__


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


def _subset_frame(kept):
    from pyspark.sql import functions as F

    return kept.select(
        "SAMPLE_ID", F.col("url").alias("URL"), F.col("text").alias("TEXT"), "HEIGHT", "WIDTH",
        F.col("score").alias("similarity"), "LANGUAGE", "punsafe", "pwatermark",
        F.col("SAMPLE_ID").alias("hash"), "key", "tar_path", "language_confidence", "image_offset", "image_size",
        "uid", "image_embedding", "text_embedding")


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
            "scored": datasets.similarity_histogram(union, "s", hist) if union is not None else [0] * bins,
            "kept": datasets.similarity_histogram(kept_union, "s", hist) if kept_union is not None else [0] * bins,
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
    base = annotated = columns.annotate(df, settings).persist(StorageLevel.MEMORY_AND_DISK)
    with timer.phase("eval_overlap"):
        annotated = _mark(annotated, columns.eval_overlap(df, settings), "eval_overlap")
    with timer.phase("semdedup"):
        drops, semdedup_info = columns.semantic_duplicates(spark, annotated, settings, output)
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
                datasets.write_embeddings(sub, fsio.join(output, EMBEDDINGS_DIR, name), rows, settings)
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
