"""CLIP scoring of one group of download shards (pure Python; the Spark stage calls it per partition).

For each shard the tar is streamed once (`udfs.download.shard_writer.iter_samples`). A producer thread reads
samples, decodes and preprocesses images and tokenizes captions into batches; the calling thread
runs the model on them. The bounded queue between the two (`prefetch_batches`) is what keeps the
model busy while the next batch is being decoded: clip-retrieval's lesson is that the GPU starves
on decoding otherwise, so the seconds spent waiting for a batch are recorded next to read,
preprocess and inference seconds.

Row outcomes: only `success` rows are scored. A success row whose image does not decode here
becomes `failed_to_decode`; one whose sample is absent from the tar (or whose tar cannot be read)
becomes `missing_from_shard`; both keep an error_message. Other rows pass through unchanged.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from udfs.clip import embeddings

log = logging.getLogger(__name__)

SUCCESS = "success"
FAILED_TO_DECODE = "failed_to_decode"
MISSING_FROM_SHARD = "missing_from_shard"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SCORE_COLUMNS = ("similarity", "similarity_multilingual", "image_embedding", "text_embedding", "tar_path")


@dataclass
class Timings:
    """Seconds per phase for one partition (summed over its batches)."""

    read: float = 0.0        # tar IO
    preprocess: float = 0.0  # image decode + resize/normalise + tokenize
    inference: float = 0.0   # model forward passes (both models when multilingual)
    wait: float = 0.0        # inference thread waiting for the next batch (starvation)
    write: float = 0.0       # clip-retrieval layout files (set by the caller)
    batches: int = 0
    images: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {k: round(getattr(self, k), 4) for k in ("read", "preprocess", "inference", "wait", "write")}
        out.update(batches=self.batches, images=self.images, **self.extra)
        return out


@dataclass
class _Batch:
    rows: list            # positions in the partition frame
    images: object        # torch tensor [n, 3, H, W]
    tokens: object        # main model tokens
    tokens_multi: object  # multilingual model tokens (or None)
    images_multi: object  # multilingual model images (or None when it shares the preprocessing)


def decode_image(data: bytes):
    """Bytes -> RGB PIL image, fully decoded (a truncated file fails here, not later)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def sample_image_bytes(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def _same_preprocess(a, b) -> bool:
    return b is None or repr(getattr(a, "_preprocess", a)) == repr(getattr(b, "_preprocess", b))


def _produce(frame: pd.DataFrame, tar_of: Callable[[int], str], read_samples: Callable[[str], Iterable[dict]],
             clip, multi, batch_size: int, out: "queue.Queue", timings: Timings, outcome: dict,
             stop: threading.Event, decode_threads: int = 1) -> None:
    """Producer thread: stream tars, decode + preprocess into batches, put them on `out`.

    With decode_threads > 1, images are decoded by a thread pool in chunks (PIL's decoders and
    resizers release the GIL), which is what a GPU needs to be fed; the tar is still read by
    this one thread, in order.
    """
    import torch

    share_images = _same_preprocess(clip, multi)
    pin = str(getattr(clip, "device", "cpu")).startswith("cuda")
    pool = None
    if decode_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="clip-decode")
    chunk_size = decode_threads * 8 if pool else 1
    pending: list[tuple[int, object, object]] = []
    chunk: list[tuple[int, bytes | None, list]] = []

    def flush():
        if not pending:
            return
        t0 = time.perf_counter()
        rows = [p for p, _, _ in pending]
        texts = [frame.at[p, "text"] if isinstance(frame.at[p, "text"], str) else "" for p in rows]
        images = torch.stack([t for _, t, _ in pending])
        batch = _Batch(rows=rows, images=images.pin_memory() if pin else images,
                       tokens=clip.tokenize(texts),
                       tokens_multi=multi.tokenize(texts) if multi is not None else None,
                       images_multi=(None if share_images or multi is None
                                     else torch.stack([m for _, _, m in pending])))
        timings.preprocess += time.perf_counter() - t0
        pending.clear()
        while not stop.is_set():
            try:
                out.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def decode_one(item):
        data, names = item
        try:
            if data is None:
                raise ValueError(f"sample has no image file (has: {names})")
            img = decode_image(data)
            return clip.preprocess(img), (None if share_images or multi is None else multi.preprocess(img)), None
        except Exception as exc:  # noqa: BLE001 - any decoder error is this row's outcome
            return None, None, f"{type(exc).__name__}: {str(exc)[:300]}"

    def process_chunk():
        if not chunk:
            return
        t0 = time.perf_counter()
        items = [(data, names) for _, data, names in chunk]
        results = list(pool.map(decode_one, items)) if pool else [decode_one(i) for i in items]
        timings.preprocess += time.perf_counter() - t0
        for (pos, _, _), (tensor, tensor_multi, error) in zip(chunk, results):
            if error is not None:
                outcome[pos] = (FAILED_TO_DECODE, error)
                continue
            pending.append((pos, tensor, tensor_multi))
            if len(pending) >= batch_size:
                flush()
        chunk.clear()

    try:
        by_shard: dict[int, dict[str, int]] = {}
        for pos in frame.index[frame["status"] == SUCCESS]:
            shard = frame.at[pos, "shard"]
            if pd.isna(shard):
                outcome[pos] = (MISSING_FROM_SHARD, "row has no shard number")
                continue
            by_shard.setdefault(int(shard), {})[str(frame.at[pos, "key"])] = pos
        for shard in sorted(by_shard):
            wanted = by_shard[shard]
            uri = tar_of(shard)
            # Only reading the tar is guarded: an unreadable/corrupt tar makes its remaining rows
            # missing_from_shard, while a model or preprocessing error must fail the task.
            read_error: Exception | None = None
            try:
                it = iter(read_samples(uri))
            except Exception as exc:  # noqa: BLE001 - unreadable tar
                read_error, it = exc, iter(())
            while read_error is None and wanted and not stop.is_set():
                t0 = time.perf_counter()
                try:
                    sample = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - corrupt tar midway
                    read_error = exc
                    break
                finally:
                    timings.read += time.perf_counter() - t0
                pos = wanted.pop(str(sample.get("__key__")), None)
                if pos is None:
                    continue
                chunk.append((pos, sample_image_bytes(sample), sorted(k for k in sample if k != "__key__")))
                if len(chunk) >= chunk_size:
                    process_chunk()
            if read_error is not None:
                log.warning("cannot read shard %s: %s", uri, read_error)
                for pos in wanted.values():
                    outcome[pos] = (MISSING_FROM_SHARD, f"cannot read shard {uri}: "
                                    f"{type(read_error).__name__}: {str(read_error)[:200]}")
                wanted.clear()
            process_chunk()
            for key, pos in wanted.items():
                outcome[pos] = (MISSING_FROM_SHARD, f"sample {key} not found in {uri}")
        flush()
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
        out.put(exc)
        return
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    out.put(None)


def score_frame(frame: pd.DataFrame, clip, tar_of: Callable[[int], str],
                read_samples: Callable[[str], Iterable[dict]], batch_size: int = 256,
                prefetch_batches: int = 2, multi=None,
                decode_threads: int = 1) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, Timings]:
    """Score the success rows of `frame` (IMAGES_METADATA columns, any shards).

    Returns (frame with SCORE_COLUMNS added and statuses updated, image embeddings [k, dim] float32,
    text embeddings [k, dim] float32, timings); the embeddings are those of the frame's scored
    rows in frame order, i.e. the rows where `similarity` is not null.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    frame = frame.reset_index(drop=True).copy()
    n = len(frame)
    timings = Timings()
    sim = np.full(n, np.nan)
    sim_multi = np.full(n, np.nan)
    img_emb = np.zeros((n, clip.dim), dtype=np.float32)
    txt_emb = np.zeros((n, clip.dim), dtype=np.float32)
    scored = np.zeros(n, dtype=bool)
    outcome: dict[int, tuple[str, str]] = {}

    if n and (frame["status"] == SUCCESS).any():
        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
        stop = threading.Event()
        producer = threading.Thread(target=_produce, name="clip-prefetch", daemon=True,
                                    args=(frame, tar_of, read_samples, clip, multi, batch_size, q,
                                          timings, outcome, stop, max(1, int(decode_threads))))
        producer.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                timings.wait += time.perf_counter() - t0
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                t0 = time.perf_counter()
                ie = clip.encode_image_tensors(item.images)
                te = clip.encode_token_tensors(item.tokens)
                rows = np.asarray(item.rows)
                img_emb[rows], txt_emb[rows] = ie, te
                sim[rows] = np.einsum("ij,ij->i", ie, te)
                if multi is not None:
                    mi = multi.encode_image_tensors(item.images if item.images_multi is None else item.images_multi)
                    mt = multi.encode_token_tensors(item.tokens_multi)
                    sim_multi[rows] = np.einsum("ij,ij->i", mi, mt)
                scored[rows] = True
                timings.inference += time.perf_counter() - t0
                timings.batches += 1
                timings.images += len(rows)
        finally:
            stop.set()
            producer.join(timeout=30)

    for pos, (status, message) in outcome.items():
        frame.at[pos, "status"] = status
        frame.at[pos, "error_message"] = message
    shards = frame["shard"] if n else pd.Series([], dtype="float64")
    in_tar = (frame["status"].isin([SUCCESS, FAILED_TO_DECODE])).to_numpy() if n else np.zeros(0, bool)
    frame["similarity"] = np.where(scored, sim, np.nan)
    frame["similarity_multilingual"] = np.where(scored & (multi is not None), sim_multi, np.nan)
    emb_img = embeddings.encode_rows(img_emb[scored]) if scored.any() else []
    emb_txt = embeddings.encode_rows(txt_emb[scored]) if scored.any() else []
    img_col = np.full(n, None, dtype=object)
    txt_col = np.full(n, None, dtype=object)
    if scored.any():
        img_col[scored] = emb_img
        txt_col[scored] = emb_txt
    frame["image_embedding"] = img_col
    frame["text_embedding"] = txt_col
    frame["tar_path"] = [tar_of(int(s)) if ok else None for s, ok in zip(shards, in_tar)]
    return frame, img_emb[scored], txt_emb[scored], timings


def retrieval_metadata(scored: pd.DataFrame) -> pd.DataFrame:
    """The clip-retrieval metadata rows for the scored rows of a `score_frame` result (same order
    as its embeddings)."""
    cols = ["key", "uid", "url", "text", "similarity", "similarity_multilingual", "width", "height",
            "shard", "tar_path"]
    rows = scored[scored["similarity"].notna()]
    return rows[[c for c in cols if c in rows.columns]].reset_index(drop=True)


def iter_chunks(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), max(1, size)):
        yield frame.iloc[start:start + size]
