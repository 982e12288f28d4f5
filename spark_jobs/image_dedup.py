"""Drop repeated images before they reach CLIP: the same bytes under another URL (sha256), and
resized / re-encoded / lightly edited copies (64-bit pHash within image_dedup.phash_distance).

Reads the download output's metadata (`<images>/*.parquet`, which has `sha256` and `phash`) and
writes `<output>/`: every metadata row, with the duplicates' status set to `duplicate_image` or
`near_duplicate`, `duplicate_of_uid` / `duplicate_of_key` naming the kept row, and for near
duplicates the pHash distance to it (also in `error_message`). `clip-score --input <output>` scores
only the rows still `success`, reading the images from the download folder named in
`<output>/_stats/stats.json` (`images`).

Rules (udfs/image_dedup/layers.py): exact: the earliest `record_date` (joined from the download input by
uid), then the smallest uid; near: the largest original_width x original_height, then the exact
rule. Near pairs are found without an all-pairs join: the hash is cut into `image_dedup.bands`
bands, rows are grouped by band and the value's top bits, pairs sharing a band value are verified
with the Hamming distance inside each group (numpy, `applyInPandas`: no candidate pair is
shuffled), and groups are the connected components of the verified pairs (iterative min-label
propagation with pointer jumping, DataFrame joins only). `image_dedup.enabled=false` writes only the
stats, and clip-score then reads the download metadata itself.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/image_dedup.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from spark_jobs import cli, datasets  # noqa: E402
from spark_jobs.columns import exact_duplicates, near_duplicates  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.schemas import IMAGE_DEDUP, IMAGES_METADATA  # noqa: E402
from udfs import fsio  # noqa: E402
from udfs.image_dedup.layers import DUPLICATE_IMAGE, NEAR_DUPLICATE, band_layout  # noqa: E402

NAME = "image-dedup"
HELP = "mark repeated images (same sha256, or pHash near-duplicates) so clip-score skips them"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="download output folder (<images>/*.parquet + *.tar)")
    parser.add_argument("--output", required=True, help="image-dedup output folder (metadata for clip-score)")
    parser.add_argument("--pairs", help="the download input, for record_date (default: image_dedup.pairs, "
                                        "else the input named in the download stats)")


def validate_section(section: dict) -> dict:
    out = dict(section)
    for key in ("phash_distance", "bands", "max_iterations"):
        if not isinstance(section.get(key), int) or isinstance(section.get(key), bool):
            raise ConfigError(f"image_dedup.{key} must be an integer, got {section.get(key)!r}")
    if not 0 <= section["phash_distance"] <= 32:
        raise ConfigError(f"image_dedup.phash_distance must be in 0..32, got {section['phash_distance']}")
    try:
        band_layout(section["bands"])
    except ValueError as exc:
        raise ConfigError(f"image_dedup.{exc}") from exc
    if section["max_iterations"] < 1:
        raise ConfigError("image_dedup.max_iterations must be >= 1")
    return out


def _record_dates(spark, pairs: str | None, storage_options):
    """uid -> earliest record_date of the download input, or None when there is none to read."""
    from pyspark.sql import functions as F

    if not pairs or not fsio.exists(pairs, storage_options):
        return None
    try:
        df = spark.read.parquet(pairs)
    except Exception as exc:  # noqa: BLE001 - unreadable: the rule falls back to uid order
        log.warning("image-dedup: cannot read record dates from %s (%s): ordering by uid only", pairs, exc)
        return None
    if not {"uid", "record_date"} <= set(df.columns):
        log.warning("image-dedup: %s has no uid/record_date: ordering by uid only", pairs)
        return None
    return df.groupBy("uid").agg(F.min(F.col("record_date").cast("string")).alias("record_date"))


def _pairs_path(images: str, explicit: str | None, section: dict, storage_options) -> str | None:
    if explicit or section.get("pairs"):
        return explicit or section["pairs"]
    if datasets.is_complete(images, storage_options):
        return datasets.read_stats(images, storage_options=storage_options).get("input")
    return None


def mark(df, exact, near):
    """Every row of `df`, the duplicates with their status, message and kept row."""
    from pyspark.sql import functions as F

    out = df
    for frame, status in ((exact, DUPLICATE_IMAGE), (near, NEAR_DUPLICATE)):
        if frame is None:
            continue
        cols = [F.col("key"), F.col("kept_uid").alias(f"{status}_uid"), F.col("kept_key").alias(f"{status}_key"),
                F.col("message").alias(f"{status}_msg")]
        if status == NEAR_DUPLICATE:
            cols.append(F.col("distance").alias("near_distance"))
        out = out.join(frame.select(*cols), "key", "left")
        hit = F.col(f"{status}_key").isNotNull()
        out = (out.withColumn("status", F.when(hit, F.lit(status)).otherwise(F.col("status")))
               .withColumn("error_message", F.when(hit, F.col(f"{status}_msg")).otherwise(F.col("error_message")))
               .withColumn("duplicate_of_uid", F.when(hit, F.col(f"{status}_uid"))
                           .otherwise(F.col("duplicate_of_uid")))
               .withColumn("duplicate_of_key", F.when(hit, F.col(f"{status}_key"))
                           .otherwise(F.col("duplicate_of_key"))))
        if status == NEAR_DUPLICATE:
            out = out.withColumn("phash_distance", F.when(hit, F.col("near_distance")).otherwise(F.col("phash_distance")))
    return out


def run(spark, cfg, args) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    timer = datasets.StageTimer()
    section = validate_section(cfg.section("image_dedup"))
    storage_options = cfg.get("storage.storage_options") or None
    images, output = args.input, args.output
    if not fsio.exists(images, storage_options):
        raise datasets.InputError(f"images folder not found: {images}")
    if not section.get("enabled", True):
        log.info("image-dedup: disabled (image_dedup.enabled=false); clip-score reads %s directly", images)
        stats = {"enabled": False, "images": images, "output": output, **timer.summary()}
        datasets.write_stats(output, NAME, stats, storage_options=storage_options)
        return stats

    with timer.phase("read"):
        pattern = fsio.join(images, "*.parquet")
        meta = datasets.conform(datasets.read_dataset(spark, pattern, IMAGES_METADATA), IMAGES_METADATA)
        pairs = _pairs_path(images, getattr(args, "pairs", None), section, storage_options)
        dates = _record_dates(spark, pairs, storage_options)
        if dates is not None:
            meta = meta.join(dates, "uid", "left")
        else:
            meta = meta.withColumn("record_date", F.expr("NULL").cast("string"))
        node = F.coalesce(F.col("key").cast("long"), F.xxhash64("key"))
        df = (meta.withColumn("node", node)
              .withColumn("duplicate_of_uid", F.expr("NULL").cast("string"))
              .withColumn("duplicate_of_key", F.expr("NULL").cast("string"))
              .withColumn("phash_distance", F.expr("NULL").cast("int"))
              .persist(StorageLevel.MEMORY_AND_DISK))
        input_rows = df.count()
    success = df.where(F.col("status") == "success")
    layers: dict = {"exact": {"enabled": bool(section["exact"])}, "near": {"enabled": bool(section["near"])}}
    exact = near = None
    try:
        with timer.phase("exact"):
            if section["exact"]:
                exact = exact_duplicates(success).persist()
                layers["exact"]["dropped"] = exact.count()
        with timer.phase("near"):
            if section["near"]:
                survivors = success if exact is None else success.join(exact.select("key"), "key", "left_anti")
                near, counts = near_duplicates(survivors, section["phash_distance"], section["bands"],
                                               section["max_iterations"])
                layers["near"].update(counts, phash_distance=section["phash_distance"], bands=section["bands"],
                                      hashed=survivors.where(F.col("phash").isNotNull()).count(),
                                      no_phash=survivors.where(F.col("phash").isNull()).count())
        with timer.phase("write"):
            datasets.write_dataset(mark(df, exact, near), output, IMAGE_DEDUP)
    finally:
        df.unpersist()
        if exact is not None:
            exact.unpersist()
    with timer.phase("stats"):
        counts = datasets.count_by(spark, output, "status")
    layers["exact"]["rows"] = counts.get(DUPLICATE_IMAGE, 0)
    layers["near"]["rows"] = counts.get(NEAR_DUPLICATE, 0)
    written = sum(counts.values())
    if written != input_rows:
        log.error("image-dedup: wrote %d rows for %d input rows", written, input_rows)
    stats = {
        "enabled": True, "images": images, "output": output, "pairs": pairs,
        "record_dates": dates is not None,
        # as download's stats: every row is written with its status; output_rows are the ones left
        "input_rows": input_rows, "output_rows": counts.get("success", 0), "metadata_rows": written,
        "status_counts": counts, "layers": layers,
        "dropped": {DUPLICATE_IMAGE: layers["exact"]["rows"], NEAR_DUPLICATE: layers["near"]["rows"]},
        **timer.summary(),
    }
    datasets.write_stats(output, NAME, stats, storage_options=storage_options)
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
