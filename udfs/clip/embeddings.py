"""Embedding storage formats shared by clip_score, filter and the index stage.

In parquet an embedding is `binary`: the little-endian float16 bytes of the L2-normalised vector
(a ViT-B/32 vector is 1 KiB). float16 is what clip-retrieval stores in its npy files too, and
halves storage against float32 with no measurable effect on cosine ranking.

The clip-retrieval layout is `img_emb/img_emb_{i}.npy`, `text_emb/text_emb_{i}.npy` (float16,
[n, dim]) and `metadata/metadata_{i}.parquet`, all row-aligned; `write_retrieval_part` writes one
such triple through fsio (local or s3).
"""

from __future__ import annotations

import io
from typing import Iterable, Sequence

import numpy as np

from udfs import fsio

DTYPE = np.dtype("<f2")


def encode(vector: np.ndarray) -> bytes:
    """One vector -> little-endian float16 bytes."""
    return np.asarray(vector, dtype=DTYPE).tobytes()


def encode_rows(matrix: np.ndarray) -> list[bytes]:
    """[n, dim] -> n byte strings (one per row)."""
    arr = np.ascontiguousarray(np.asarray(matrix, dtype=DTYPE))
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {arr.shape}")
    width = arr.shape[1] * DTYPE.itemsize
    raw = arr.tobytes()
    return [raw[i * width:(i + 1) * width] for i in range(arr.shape[0])]


def decode(blob: bytes, dtype=np.float32) -> np.ndarray:
    """Bytes -> 1-D vector (float32 by default, for arithmetic)."""
    return np.frombuffer(blob, dtype=DTYPE).astype(dtype)


def decode_rows(blobs: Iterable[bytes | None], dim: int | None = None, dtype=np.float32) -> np.ndarray:
    """Byte strings -> [n, dim]. A None or wrong-sized blob is an error (callers select scored rows)."""
    blobs = list(blobs)
    if not blobs:
        return np.zeros((0, dim or 0), dtype=dtype)
    if any(b is None for b in blobs):
        raise ValueError("cannot decode a null embedding")
    sizes = {len(b) for b in blobs}
    if len(sizes) != 1:
        raise ValueError(f"embeddings of different sizes: {sorted(sizes)} bytes")
    width = sizes.pop() // DTYPE.itemsize
    if dim is not None and width != dim:
        raise ValueError(f"embedding has {width} dimensions, expected {dim}")
    return np.frombuffer(b"".join(bytes(b) for b in blobs), dtype=DTYPE).reshape(len(blobs), width).astype(dtype)


def npy_bytes(matrix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(matrix, dtype=DTYPE), allow_pickle=False)
    return buf.getvalue()


def write_npy(uri: str, matrix: np.ndarray, storage_options: dict | None = None) -> None:
    """Write [n, dim] as a float16 .npy file (atomically on local disks)."""
    fsio.write_bytes_atomic(uri, npy_bytes(matrix), storage_options)


def read_npy(uri: str, storage_options: dict | None = None) -> np.ndarray:
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        return np.load(io.BytesIO(fh.read()), allow_pickle=False)


def retrieval_paths(root: str, index: int) -> dict[str, str]:
    return {
        "img_emb": fsio.join(root, "img_emb", f"img_emb_{index}.npy"),
        "text_emb": fsio.join(root, "text_emb", f"text_emb_{index}.npy"),
        "metadata": fsio.join(root, "metadata", f"metadata_{index}.parquet"),
    }


def write_retrieval_part(root: str, index: int, img_emb: np.ndarray, text_emb: np.ndarray | None,
                         metadata, storage_options: dict | None = None) -> dict[str, str]:
    """Write one row-aligned triple of the clip-retrieval layout under `root`.

    `metadata` is a pandas DataFrame or pyarrow Table with one row per embedding row. The
    metadata file is written last, so a reader that finds it also finds both npy files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = metadata if isinstance(metadata, pa.Table) else pa.Table.from_pandas(metadata, preserve_index=False)
    n = len(img_emb)
    if table.num_rows != n or (text_emb is not None and len(text_emb) != n):
        raise ValueError(f"row counts differ: img_emb {n}, text_emb "
                         f"{None if text_emb is None else len(text_emb)}, metadata {table.num_rows}")
    paths = retrieval_paths(root, index)
    write_npy(paths["img_emb"], img_emb, storage_options)
    if text_emb is not None:
        write_npy(paths["text_emb"], text_emb, storage_options)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fsio.write_bytes_atomic(paths["metadata"], buf.getvalue(), storage_options)
    return paths


def list_retrieval_parts(root: str, storage_options: dict | None = None) -> list[int]:
    """The part indices present under `root` (by their metadata files), sorted numerically."""
    found = fsio.expand([fsio.join(root, "metadata", "metadata_*.parquet")], storage_options)
    out = []
    for path in found:
        stem = path.rsplit("/", 1)[-1][len("metadata_"):-len(".parquet")]
        if stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def npy_shape(uri: str, storage_options: dict | None = None) -> tuple[int, ...]:
    """The shape of a .npy file from its header alone (public numpy format API, no data read)."""
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        major, _ = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return tuple(int(d) for d in read_header(fh)[0])


def parquet_rows(uri: str, storage_options: dict | None = None) -> int:
    import pyarrow.parquet as pq

    with fsio.open_uri(uri, "rb", storage_options) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def check_retrieval_layout(root: str, storage_options: dict | None = None) -> dict:
    """{"parts", "rows"} of the layout under `root`, read back from the files: each part's npy
    headers and parquet footer must agree, else RuntimeError names the part."""
    parts = list_retrieval_parts(root, storage_options)
    rows = 0
    for i in parts:
        paths = retrieval_paths(root, i)
        counts = [npy_shape(paths[k], storage_options)[0] for k in ("img_emb", "text_emb")]
        counts.append(parquet_rows(paths["metadata"], storage_options))
        if len(set(counts)) != 1:
            raise RuntimeError(f"clip-retrieval part {i} under {root} is not row-aligned: "
                               f"img/text/metadata rows {counts}")
        rows += counts[0]
    return {"parts": len(parts), "rows": rows}


def read_retrieval(root: str, storage_options: dict | None = None,
                   parts: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, "object"]:
    """All parts concatenated: (img_emb, text_emb, metadata pandas DataFrame). For tests and
    small outputs; the index stage streams parts instead."""
    import pandas as pd
    import pyarrow.parquet as pq

    parts = list_retrieval_parts(root, storage_options) if parts is None else list(parts)
    imgs, txts, metas = [], [], []
    for i in parts:
        paths = retrieval_paths(root, i)
        imgs.append(read_npy(paths["img_emb"], storage_options))
        if fsio.exists(paths["text_emb"], storage_options):
            txts.append(read_npy(paths["text_emb"], storage_options))
        with fsio.open_uri(paths["metadata"], "rb", storage_options) as fh:
            metas.append(pq.read_table(io.BytesIO(fh.read())).to_pandas())
    if not parts:
        return np.zeros((0, 0), DTYPE), np.zeros((0, 0), DTYPE), pd.DataFrame()
    return (np.concatenate(imgs), np.concatenate(txts) if txts else np.zeros((0, 0), DTYPE),
            pd.concat(metas, ignore_index=True))
