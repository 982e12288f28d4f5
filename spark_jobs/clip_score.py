"""Score downloaded image/text pairs with CLIP (LAION's filtering signal).

Reads the download output (`<images>/*.parquet` metadata + `{shard:05d}.tar` webdataset shards) and
writes `<scored>/`: every metadata row, partitioned by status, with `similarity` (cosine of the
normalised image and text embeddings) and both embeddings (float16) for the `success` rows; rows
that were not downloaded pass through with their status. The same embeddings are also written in
clip-retrieval's layout, `<scored>/img_emb/img_emb_{i}.npy`, `text_emb/text_emb_{i}.npy` and
`metadata/metadata_{i}.parquet` (row-aligned; part i holds shards i*k .. i*k+k-1 with
k = clip.shards_per_embedding_file), which clip-retrieval's tools read directly.

The model is built once per Python worker (never pickled from the driver), on the GPU Spark
assigned to the task when there is one (fp16 autocast), else on the CPU. A prefetch thread
decodes and preprocesses the next batches while the model runs; per-partition read / preprocess /
inference / wait / write seconds land in `<scored>/_stats/stats.json`.

Model: --set clip.model=ViT-B-32 --set clip.pretrained=laion2b_s34b_b79k (tag; needs internet on
the workers) or clip.pretrained=s3://bucket/ckpt.pt (any fsspec URI or local path), or an open_clip
local folder: --set clip.model=local-dir:tests/fixtures/tiny_clip (the test model).
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/clip_score.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from spark_jobs import cli, datasets  # noqa: E402
from spark_jobs.config import ConfigError  # noqa: E402
from spark_jobs.schemas import IMAGE_DEDUP, IMAGES_METADATA, SCORED  # noqa: E402
from udfs import fsio  # noqa: E402
from udfs.clip import embeddings, partition  # noqa: E402

NAME = "clip-score"
HELP = "CLIP similarity and embeddings for the downloaded pairs (open_clip, GPU when present)"

log = logging.getLogger(__name__)

PART_STATS_DIR = "parts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="download output folder (<images>/*.parquet + *.tar), or the image-dedup output")
    parser.add_argument("--output", required=True, help="scored output folder")


def _model_specs(clip_cfg: dict, storage_options: dict | None) -> tuple[dict, dict | None]:
    """Validate the configured model(s) on the driver, before any task starts."""
    from udfs.clip.clip_model import ModelLoadError, check_model_spec

    try:
        main = check_model_spec(clip_cfg.get("model"), clip_cfg.get("pretrained"), storage_options)
        multi = None
        if clip_cfg.get("multilingual_model"):
            multi = check_model_spec(clip_cfg["multilingual_model"], clip_cfg.get("multilingual_pretrained"),
                                     storage_options)
    except ModelLoadError as exc:
        raise ConfigError(f"clip: {exc}") from exc
    return main, multi


def _count_parts(metadata_files: list[str], per_file: int) -> int | None:
    """Embedding parts from the download output's file names ({shard:05d}.parquet holds shard's
    rows, every row has its shard), without a Spark job; None when a name does not say its shard."""
    from udfs.download.download_worker import shard_of

    shards = [shard_of(uri, ".parquet") for uri in metadata_files]
    if None in shards:
        return None
    return max(1, len({s // per_file for s in shards}))


def make_partition_scorer(clip_cfg: dict, main: dict, multi: dict | None, images: str, output: str,
                          storage_options: dict | None):
    """The mapInPandas function: udfs.clip.partition.score_partition with the task's context. It
    closes over plain dicts and strings only: the model is built inside the worker, once per process."""
    columns = SCORED.schema.fieldNames()
    part_stats_dir = fsio.join(output, datasets.STATS_DIR, PART_STATS_DIR)

    def score_partitions(batches):
        from udfs.clip.partition import score_partition

        try:
            from pyspark import TaskContext

            ctx = TaskContext.get()
        except ImportError:  # pragma: no cover - only outside Spark
            ctx = None
        yield from score_partition(batches, ctx, clip_cfg, main, multi, images, part_stats_dir, output,
                                   storage_options, columns)

    return score_partitions


def image_dedup_source(path: str, storage_options: dict | None) -> tuple[str | None, str]:
    """(image-dedup dataset or None, download folder) for `--input`: an image-dedup output names
    the download folder (the tars) in its stats; disabled, it has no dataset of its own."""
    if datasets.is_complete(path, storage_options):
        stats = datasets.read_stats(path, storage_options=storage_options)
        if stats.get("stage") == "image-dedup":
            return (path if stats.get("enabled") else None), stats["images"]
    return None, path


def run(spark, cfg, args) -> dict:
    from pyspark.sql import functions as F

    timer = datasets.StageTimer()
    clip_cfg = cfg.section("clip")
    storage_options = cfg.get("storage.storage_options") or None
    main, multi = _model_specs(clip_cfg, storage_options)
    images, output = args.input, args.output
    per_file = max(1, int(clip_cfg.get("shards_per_embedding_file") or 1))

    with timer.phase("read metadata"):
        deduped, images = image_dedup_source(images, storage_options)
        pattern = fsio.join(images, "*.parquet")
        if not fsio.exists(images, storage_options):
            raise datasets.InputError(f"images folder not found: {images}")
        found = fsio.expand([pattern], storage_options)
        if not found:
            raise datasets.InputError(f"no shard metadata ({pattern}) in {images}: is it a download output?")
        if deduped:   # the image-dedup output: the same rows, duplicates no longer `success`
            df = datasets.conform(datasets.read_dataset(spark, deduped, IMAGE_DEDUP), IMAGES_METADATA)
        else:
            df = datasets.conform(datasets.read_dataset(spark, pattern, IMAGES_METADATA), IMAGES_METADATA)
        part_col = F.floor(F.coalesce(F.col("shard"), F.lit(-per_file)) / F.lit(per_file))
        n_parts = _count_parts(found, per_file)
        if n_parts is None:   # metadata files not named {shard:05d}.parquet: ask Spark
            n_parts = max(1, df.select(part_col.alias("p")).distinct().count())

    scorer = make_partition_scorer(clip_cfg, main, multi, images, output, storage_options)
    scored = (df.repartitionByRange(n_parts, part_col)
                .sortWithinPartitions("shard", "key")
                .mapInPandas(scorer, SCORED.schema))
    with timer.phase("score and write"):
        try:
            datasets.write_dataset(scored, output, SCORED)
        except Exception as exc:  # noqa: BLE001 - a model that fails to load in a worker is a config error
            message = str(exc)
            if "ModelLoadError" in message:
                line = next((ln for ln in message.splitlines() if "ModelLoadError" in ln), message)
                raise ConfigError("clip: " + line.split("ModelLoadError:", 1)[-1].strip()) from exc
            raise

    with timer.phase("stats"):
        written = datasets.read_dataset(spark, output, SCORED)
        status_counts = {str(r["status"]): int(r["n"]) for r in
                         written.groupBy("status").agg(F.count("*").alias("n")).collect()}
        sim = (written.where(F.col("similarity").isNotNull())
               .agg(F.count("*").alias("n"), F.mean("similarity").alias("mean"),
                    F.min("similarity").alias("min"), F.max("similarity").alias("max"),
                    F.count("similarity_multilingual").alias("n_multi")).collect()[0])
        layout = embeddings.check_retrieval_layout(output, storage_options)
        tasks = partition.sum_part_stats(fsio.join(output, datasets.STATS_DIR, PART_STATS_DIR), storage_options)
    if layout["rows"] != int(sim["n"]):
        raise RuntimeError(f"clip-retrieval layout has {layout['rows']} rows, parquet has {sim['n']} scored rows")
    stats = {
        "input": images, "output": output,
        "model": {"model": clip_cfg.get("model"), "pretrained": clip_cfg.get("pretrained"), "kind": main["kind"],
                  "multilingual_model": clip_cfg.get("multilingual_model"),
                  "batch_size": clip_cfg.get("batch_size"), "precision": clip_cfg.get("precision")},
        "rows": sum(status_counts.values()), "status_counts": status_counts,
        # as download's stats: output_rows are the useful rows (scored); every input row is still
        # written, with its status
        "input_rows": sum(status_counts.values()), "output_rows": int(sim["n"]),
        "scored": int(sim["n"]), "scored_multilingual": int(sim["n_multi"]),
        "similarity": {"mean": sim["mean"], "min": sim["min"], "max": sim["max"]},
        "retrieval_layout": layout, "tasks": tasks,
        **timer.summary(),
    }
    datasets.write_stats(output, NAME, stats, storage_options=storage_options)
    return stats


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
