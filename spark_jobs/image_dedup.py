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
