"""clip-score's work inside one Spark task, without Spark: score a partition's rows with CLIP and
write its clip-retrieval parts; which GPU the task got; the partitions' timings.

The stage (spark_jobs/clip_score.py) passes plain dicts and strings and the task's TaskContext,
so nothing here imports pyspark and the model is never pickled from the driver.
"""

from __future__ import annotations

import logging
import time

from udfs import fsio

log = logging.getLogger(__name__)


def tar_uri(images: str, shard: int) -> str:
    return fsio.join(images, f"{int(shard):05d}.tar")


def score_partition(batches, ctx, clip_cfg: dict, main: dict, multi: dict | None, images: str,
                    part_stats_dir: str, output: str, storage_options: dict | None, columns: list[str]):
    """One Spark partition of metadata rows (pandas batches) -> the same rows scored, in chunks of
    `columns` (the scored schema), with the clip-retrieval parts written beside and this
    partition's timings written to `part_stats_dir`. `ctx`: the task's TaskContext (None outside
    Spark). The model is built here, once per worker process (clip_model.cached_clip)."""
    batch_size = int(clip_cfg.get("batch_size") or 256)
    prefetch = int(clip_cfg.get("prefetch_batches") or 2)
    decode_threads = max(1, int(clip_cfg.get("decode_threads") or 1))
    per_file = max(1, int(clip_cfg.get("shards_per_embedding_file") or 1))
    out_rows = max(1, int(clip_cfg.get("output_rows_per_batch") or 4096))
    import pandas as pd

    from udfs.clip import clip_model, clip_scoring, embeddings
    from udfs.download import shard_writer

    pid = ctx.partitionId() if ctx is not None else 0
    gpus = assigned_gpus(ctx)
    threads = clip_cfg.get("torch_threads") or (ctx.cpus() if ctx is not None else None)

    frames = [b for b in batches if len(b)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns[:-5])
    part_stats = {"partition": pid, "rows": int(len(frame)), "parts": [], "model_load_seconds": 0.0}
    started = time.perf_counter()
    model = multi_model = None
    if len(frame) and (frame["status"] == clip_scoring.SUCCESS).any():
        t0 = time.perf_counter()
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        device = task_device(clip_cfg.get("device", "auto"), gpus)
        model = clip_model.cached_clip(main["model"], main["pretrained"], device,
                                       clip_cfg.get("precision", "auto"), None, storage_options)
        if multi is not None:
            multi_model = clip_model.cached_clip(multi["model"], multi["pretrained"], device,
                                                 clip_cfg.get("precision", "auto"), None, storage_options)
        part_stats["model_load_seconds"] = round(time.perf_counter() - t0, 3)
        part_stats["device"] = model.device
    part_stats["gpu_addresses"] = gpus

    def read_samples(uri):
        return shard_writer.iter_samples(uri, storage_options)

    def tar_of(shard):
        return tar_uri(images, shard)

    if len(frame):
        part_key = (frame["shard"].fillna(-per_file).astype("int64") // per_file)
        for part, group in frame.groupby(part_key, sort=True):
            if model is None:  # nothing to score in this partition
                scored = clip_scoring.score_frame(group, _NoModel(), tar_of, read_samples)[0]
                timings = clip_scoring.Timings()
            else:
                scored, img, txt, timings = clip_scoring.score_frame(
                    group, model, tar_of, read_samples, batch_size, prefetch, multi_model, decode_threads)
                if len(img) and part >= 0:
                    t0 = time.perf_counter()
                    embeddings.write_retrieval_part(output, int(part), img, txt,
                                                    clip_scoring.retrieval_metadata(scored), storage_options)
                    timings.write += time.perf_counter() - t0
                    timings.extra["retrieval_rows"] = int(len(img))
            part_stats["parts"].append({"part": int(part), **timings.as_dict()})
            for chunk in clip_scoring.iter_chunks(scored[columns], out_rows):
                yield chunk
    part_stats["seconds"] = round(time.perf_counter() - started, 3)
    fsio.write_json(fsio.join(part_stats_dir, f"partition_{pid:05d}.json"), part_stats, storage_options)
    log.info("clip-score partition %d: %d rows in %.1fs", pid, len(frame), part_stats["seconds"])


def assigned_gpus(ctx) -> list[str] | None:
    """The GPU addresses Spark assigned to this task (`spark.task.resource.gpu.amount` with the
    executor's discovery script), from `TaskContext.resources()`; None without GPU scheduling."""
    resources = ctx.resources() if ctx is not None else {}
    gpu = resources.get("gpu")
    addresses = [str(a).strip() for a in gpu.addresses] if gpu is not None else []
    return addresses or None


def task_device(requested: str, gpus: list[str] | None, has_cuda: bool | None = None) -> str:
    """The torch device of this task: with `auto`, the first GPU Spark assigned ("cuda:3"), not
    "cuda:0" by habit, so tasks sharing a multi-GPU executor each use their own GPU; the CPU when
    the worker sees no CUDA."""
    from udfs.clip.clip_model import select_device

    return select_device(requested, gpus, has_cuda)


class _NoModel:
    """Stands in for a model in partitions without success rows (nothing is encoded)."""

    dim = 0


def sum_part_stats(part_stats_dir: str, storage_options: dict | None) -> dict:
    """The partitions' timings (score_partition's files) summed for the stage's stats."""
    files = fsio.expand([fsio.join(part_stats_dir, "partition_*.json")], storage_options)
    entries = [fsio.read_json(f, storage_options) for f in files]
    totals = {k: 0.0 for k in ("read", "preprocess", "inference", "wait", "write", "model_load")}
    images = batches = 0
    per_part = []
    for e in entries:
        totals["model_load"] += e.get("model_load_seconds", 0.0)
        for p in e.get("parts", []):
            for k in ("read", "preprocess", "inference", "wait", "write"):
                totals[k] += p.get(k, 0.0)
            images += p.get("images", 0)
            batches += p.get("batches", 0)
            per_part.append({"partition": e["partition"], **p})
    devices = sorted({e["device"] for e in entries if e.get("device")})
    return {"partitions": len(entries), "images_scored": images, "batches": batches,
            "task_seconds": {k: round(v, 3) for k, v in totals.items()},
            "images_per_inference_second": round(images / totals["inference"], 2) if totals["inference"] else None,
            "devices": devices, "per_part": per_part[:2000]}
