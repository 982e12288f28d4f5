"""clip-score throughput on CPU against the limit: a raw open_clip forward pass over the same
preprocessed batches, measured in the same run on the same model and batch size.

Figures (images/s; ratio = ours / raw forward; goal >= 0.9):
- `score_frame` (what one Spark task runs: tar streaming, JPEG decode + preprocessing in the
  prefetch thread, tokenisation, inference, embedding encoding) for the tiny test model and for a
  ViT-B-32 with random weights (no weights can be downloaded here; random weights cost the same
  FLOPs as trained ones, so the throughput is representative, the similarities are not);
- the whole stage through local Spark (full run only): metadata read, partitioning, scoring,
  parquet + npy writes, stats;
- single-thread decode + preprocess rate (images/s per core), which sets how many decode threads
  a GPU needs to be fed (see the note of that figure).

Inputs: 256 x 256 JPEGs drawn by tests/gen/shapes.py (the download stage's default image size),
in webdataset shards written by tests/gen/image_shards.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

A100_VIT_B32 = 2500.0   # clip-retrieval: ViT-B/32 images/s on one A100 (LAION-REFERENCE.md)


def _images(work: Path, n: int, shard_size: int = 512) -> Path:
    from tests.gen.image_shards import mixed_rows, write_images_folder

    folder = work / f"images_{n}_{shard_size}"
    if not (folder / "00000.parquet").exists():
        rows = mixed_rows(n, seed=3, mismatch_every=2)
        for r in rows:
            r.size = 256
        write_images_folder(folder, [rows[i:i + shard_size] for i in range(0, n, shard_size)])
    return folder


def _frame(folder: Path):
    import pandas as pd

    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)


def _tar_of(folder: Path):
    return lambda shard: str(folder / f"{int(shard):05d}.tar")


def _preprocessed(model, folder: Path, frame):
    """All images decoded and preprocessed, and all captions tokenised (untimed: the raw limit)."""
    import torch

    from udfs.clip import clip_scoring
    from udfs.download import shard_writer

    tensors, texts = [], dict(zip(frame["key"], frame["text"]))
    keys = []
    t0 = time.perf_counter()
    for shard in sorted(frame["shard"].unique()):
        for sample in shard_writer.iter_samples(_tar_of(folder)(shard)):
            tensors.append(model.preprocess(clip_scoring.decode_image(sample["jpg"])))
            keys.append(sample["__key__"])
    decode_seconds = time.perf_counter() - t0
    return torch.stack(tensors), model.tokenize([texts[k] for k in keys]), decode_seconds


def _raw(model, images, tokens, batch_size: int) -> float:
    """Images/s of the bare forward passes (image + text towers), batch by batch."""
    import torch

    n = len(images)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            model.model.encode_image(images[i:i + batch_size])
            model.model.encode_text(tokens[i:i + batch_size])
    return n / (time.perf_counter() - t0)


def _ours(model, folder: Path, frame, batch_size: int, prefetch: int):
    from udfs.clip import clip_scoring
    from udfs.download import shard_writer

    t0 = time.perf_counter()
    out, img, _, timings = clip_scoring.score_frame(frame, model, _tar_of(folder), shard_writer.iter_samples,
                                                    batch_size, prefetch)
    elapsed = time.perf_counter() - t0
    assert len(img) == len(frame)
    return len(img) / elapsed, timings


def _compare(name: str, model, folder: Path, batch_size: int, repeats: int, note: str,
             goal: str = ">= 0.9") -> list[dict]:
    frame = _frame(folder)
    images, tokens, decode_seconds = _preprocessed(model, folder, frame)
    _raw(model, images[:batch_size], tokens[:batch_size], batch_size)   # warm-up
    raws, ours, phases = [], [], None
    for _ in range(repeats):   # interleaved, so machine noise hits both sides alike
        raws.append(_raw(model, images, tokens, batch_size))
        rate, timings = _ours(model, folder, frame, batch_size, prefetch=2)
        ours.append(rate)
        phases = timings.as_dict()
    raw, our = statistics.median(raws), statistics.median(ours)
    return [
        {"name": f"{name} score_frame images/s (batch {batch_size}, {len(frame)} images)", "value": round(our, 1),
         "unit": "images/s", "peer": "raw open_clip forward, same model/batch/run", "peer_value": round(raw, 1),
         "ratio": round(our / raw, 3), "goal": goal,
         "note": f"{note} phases of the last run (s): " + ", ".join(f"{k} {v}" for k, v in phases.items()
                                                                     if k in ("read", "preprocess", "inference", "wait"))},
        {"name": f"{name} decode+preprocess, 1 thread", "value": round(len(frame) / decode_seconds, 1),
         "unit": "images/s", "peer": "raw forward (the consumer)", "peer_value": round(raw, 1),
         "ratio": round(len(frame) / decode_seconds / raw, 3), "goal": ">= 1 (prefetch keeps up)",
         "note": "256 px JPEG decode + resize/normalise in one Python thread (PIL); the producer side of the prefetch"},
    ]


def _spark_stage(work: Path, folder: Path, model_overrides: list[str], batch_size: int) -> dict:
    import argparse as ap

    from spark_jobs import clip_score
    from spark_jobs.config import load_config
    from spark_jobs.session import get_spark

    cfg = load_config("local", overrides=["spark.master=local[1]", "spark.conf.spark.ui.enabled=false",
                                          "spark.conf.spark.ui.showConsoleProgress=false",
                                          f"clip.batch_size={batch_size}", *model_overrides])
    spark = get_spark(cfg, "bench-clip")
    # A running session, as in `clipcrawl run` (download ran before on it): a JVM-only job warms the
    # JVM; no Python worker is started, so the worker's torch import and model build still count.
    spark.range(2_000_000).selectExpr("sum(id)").collect()
    args = ap.Namespace(input=str(folder), output=str(work / "scored"))
    t0 = time.perf_counter()
    stats = clip_score.run(spark, cfg, args)
    return {"seconds": time.perf_counter() - t0, "stats": stats}


def run(work: Path, quick: bool) -> list[dict]:
    import torch


    work.mkdir(parents=True, exist_ok=True)
    # One torch thread, as a Spark task gets by default (clip.torch_threads null -> spark.task.cpus=1).
    # On this shared 2-core machine two OpenMP threads are also ~5-10x SLOWER than one (they spin
    # while the other core is busy), which would make any figure meaningless.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(work, quick)
    finally:
        torch.set_num_threads(previous_threads)


def _run(work: Path, quick: bool) -> list[dict]:
    import torch

    from udfs.clip import clip_model

    threads = torch.get_num_threads()
    figures: list[dict] = []
    tiny_n, vit_n, repeats = (256, 64, 1) if quick else (2048, 256, 2)
    # the Spark figure: enough images that the fixed costs (session-side planning, the worker's torch
    # import and model build, stats) weigh as they would on real shards, not dominate
    stage_n = 1024
    tiny = clip_model.load_clip("local-dir:tests/fixtures/tiny_clip", None, device="cpu")
    figures += _compare("tiny_clip", tiny, _images(work, tiny_n), 256, repeats,
                        f"tiny 2-layer width-64 ViT at 32 px; torch threads {threads}. Its forward pass costs less "
                        "than decoding a 256 px JPEG, so the producer (decode) bounds this figure, not the overlap: "
                        "the raw limit excludes decoding by definition.",
                        goal="info (decode-bound; the goal applies to ViT-B-32 below)")
    vit = clip_model.load_clip("ViT-B-32", None, device="cpu")   # random init: no weights downloadable here
    vit_folder = _images(work, vit_n)
    figures += _compare("ViT-B-32 (random init)", vit, vit_folder, 64, repeats,
                        f"ViT-B-32 with random weights (same FLOPs as trained); torch threads {threads}.")
    raw_vit = figures[-2]["peer_value"]
    decode_rate = figures[-1]["value"]
    if not quick:
        # local[1]: one task slot with one torch thread, the same resources as the raw forward pass (on
        # this shared 2-core machine two concurrent tasks would measure the other tenants, not us);
        # two shards, so the worker's second task reuses the cached model
        stage_folder = _images(work, stage_n, stage_n // 2)
        # the limit again, right before the Spark run (this machine's load drifts within minutes)
        images, tokens, _ = _preprocessed(vit, vit_folder, _frame(vit_folder))
        raw_before = _raw(vit, images, tokens, 64)
        del images, tokens
        res = _spark_stage(work, stage_folder, ["clip.model=ViT-B-32", "clip.pretrained=null"], 64)
        scored = res["stats"]["scored"]
        stage_seconds = res["seconds"]   # the whole clip_score.run call: every Spark job of the stage
        phases = res["stats"]["phase_seconds"]
        t = res["stats"]["tasks"]["task_seconds"]
        limit = (raw_vit + raw_before) / 2
        steady = scored / max(1e-9, stage_seconds - t["model_load"])
        in_task = scored / t["inference"] if t["inference"] else 0.0
        figures.append({
            "name": f"ViT-B-32 (random init) clip-score stage, Spark local[1], {scored} images",
            "value": round(scored / stage_seconds, 1), "unit": "images/s",
            "peer": "raw open_clip forward, same model/batch/run (mean of two measurements)",
            "peer_value": round(limit, 1),
            "ratio": round(scored / stage_seconds / limit, 3), "goal": ">= 0.9",
            "note": (f"whole clip_score.run on a running session warmed by a JVM-only job ({stage_seconds:.1f}s: "
                     + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())
                     + f"), 2 shards = 2 tasks, parquet + npy writes, including the model build in the Python "
                     f"worker ({t['model_load']:.1f}s incl. importing torch; once per worker: without it "
                     f"{steady:.1f} images/s, ratio {steady / limit:.2f}); forward passes inside the task ran at "
                     f"{in_task:.1f} images/s; summed task seconds: read {t['read']:.2f}, preprocess "
                     f"{t['preprocess']:.2f}, inference {t['inference']:.2f}, wait {t['wait']:.2f}, "
                     f"write {t['write']:.2f}")})
    figures.append({
        "name": "GPU: decode threads needed to feed ViT-B/32 at clip-retrieval's A100 rate",
        "value": round(A100_VIT_B32 / decode_rate, 1), "unit": "threads",
        "peer": "clip-retrieval ViT-B/32 on one A100", "peer_value": A100_VIT_B32, "ratio": None, "goal": "info",
        "note": (f"one decode thread does {decode_rate} images/s here, so 2,500 images/s per A100 needs about that "
                 "many decoding cores per GPU (spark.task.cpus) or GPU JPEG decoding (nvjpeg/DALI); plus fp16 "
                 "autocast (on by default on CUDA), batch >= 256 and pinned-memory non-blocking copies. The "
                 "prefetch producer here is one thread per task: on a GPU executor it would need a decode pool. "
                 "Not measured on a GPU (none here)."),
    })
    return figures


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    for fig in run(Path("bench/work/clip"), a.quick):
        print(fig)
