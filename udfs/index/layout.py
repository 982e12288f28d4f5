"""What the kNN index build and search agree on: the embeddings layout read, the index files written.

Layout read (contract 4): `<dataset>/embeddings/<subset>/{img_emb/img_emb_{i}.npy,
text_emb/text_emb_{i}.npy, metadata/metadata_{i}.parquet}`, row-aligned. Layout written
(contract 5): `<indices>/<subset>/{image.index, text.index, index_infos.json, ids.parquet}`.

Index ids are row numbers in the order autofaiss (embedding_reader) reads the npy files: sorted by
path, so `img_emb_10.npy` comes before `img_emb_2.npy`. The ids parquet is written from the
metadata files in exactly that order, which is what makes id -> metadata lookups right; the order
is taken from embedding_reader itself rather than re-implemented. The image and text indices
share one id space because the image and text npy files are row-aligned.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import numpy as np

from udfs import fsio
from udfs.clip import embeddings

log = logging.getLogger(__name__)


KINDS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}


INDEX_FILES = {"image": "image.index", "text": "text.index"}


INFOS_FILE = "index_infos.json"


IDS_FILE = "ids.parquet"


# Columns of the ids parquet, after `index_id`. punsafe/pwatermark ride along so the server can
# apply the safety cut without a join.
ID_COLUMNS = ("SAMPLE_ID", "URL", "TEXT", "similarity", "LANGUAGE", "punsafe", "pwatermark",
              "key", "tar_path", "WIDTH", "HEIGHT")


class EmbeddingLayoutError(ValueError):
    """The embeddings folder is missing, incomplete or not row-aligned (a user-fixable input)."""


class QueryError(ValueError):
    """A query that cannot be answered as asked (bad k, unknown subset, wrong dimension...)."""


@dataclass
class EmbeddingPart:
    number: str                 # the `{i}` of img_emb_{i}.npy
    image_npy: str
    text_npy: str
    metadata: str
    rows: int


def find_subsets(dataset: str, storage_options: dict | None = None) -> list[str]:
    """Subset names that have an embeddings folder under `<dataset>/embeddings/`."""
    root = fsio.join(dataset, "embeddings")
    if not fsio.exists(root, storage_options):
        raise EmbeddingLayoutError(f"no embeddings folder at {root} (expected the filter output)")
    fs, path = fsio.filesystem(root, storage_options)
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)
                   if fs.isdir(p))
    return [n for n in names if not n.startswith(("_", "."))]


def _npy_rows_dim(uri: str, storage_options: dict | None) -> tuple[int, int]:
    shape = embeddings.npy_shape(uri, storage_options)
    if len(shape) != 2:
        raise EmbeddingLayoutError(f"{uri}: expected a 2-d array, got shape {shape}")
    return shape[0], shape[1]


def _number_of(name: str, prefix: str, suffix: str) -> str | None:
    base = posixpath.basename(name)
    if base.startswith(prefix) and base.endswith(suffix):
        return base[len(prefix):-len(suffix)]
    return None


def list_parts(subset_root: str, storage_options: dict | None = None) -> list[EmbeddingPart]:
    """The row-aligned (image npy, text npy, metadata) triples of one subset, in index-id order.

    Every triple must be complete and have equal row counts; otherwise ids would point at the
    wrong captions, so this raises instead of guessing.
    """
    from embedding_reader.get_file_list import get_file_list

    img_dir = fsio.join(subset_root, "img_emb")
    if not fsio.exists(img_dir, storage_options):
        raise EmbeddingLayoutError(f"no img_emb folder under {subset_root}")
    _, img_files = get_file_list(fsio.normalize_uri(img_dir), "npy")  # embedding_reader's order
    parts = []
    for img in img_files:
        number = _number_of(img, "img_emb_", ".npy")
        if number is None:
            continue
        text_npy = fsio.join(subset_root, "text_emb", f"text_emb_{number}.npy")
        meta = fsio.join(subset_root, "metadata", f"metadata_{number}.parquet")
        image_npy = fsio.join(img_dir, posixpath.basename(img))
        for needed in (text_npy, meta):
            if not fsio.exists(needed, storage_options):
                raise EmbeddingLayoutError(f"{needed} is missing (it pairs with {image_npy})")
        rows, _ = _npy_rows_dim(image_npy, storage_options)
        text_rows, _ = _npy_rows_dim(text_npy, storage_options)
        meta_rows = embeddings.parquet_rows(meta, storage_options)
        if not rows == text_rows == meta_rows:
            raise EmbeddingLayoutError(
                f"part {number} of {subset_root} is not row-aligned: img_emb {rows} rows, "
                f"text_emb {text_rows}, metadata {meta_rows}")
        parts.append(EmbeddingPart(number, image_npy, text_npy, meta, rows))
    return parts


def load_part(part: EmbeddingPart, kind: str, storage_options: dict | None = None) -> np.ndarray:
    uri = part.image_npy if kind == "image" else part.text_npy
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        return np.load(fh).astype(np.float32, copy=False)


def write_ids(parts: list[EmbeddingPart], target: str, storage_options: dict | None = None) -> int:
    """Write the id -> metadata parquet, one row group per part, streaming (one part in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("index_id", pa.int64()), ("SAMPLE_ID", pa.int64()), ("URL", pa.string()),
                        ("TEXT", pa.string()), ("similarity", pa.float64()),
                        ("LANGUAGE", pa.string()), ("punsafe", pa.float64()),
                        ("pwatermark", pa.float64()), ("key", pa.string()),
                        ("tar_path", pa.string()),
                        ("WIDTH", pa.int32()), ("HEIGHT", pa.int32())])  # original size: serve's size filter
    offset = 0
    with fsio.open_uri(target + ".tmp", "wb", storage_options) as fh:
        with pq.ParquetWriter(fh, schema, compression="zstd") as writer:
            for part in parts:
                with fsio.open_uri(part.metadata, "rb", storage_options) as mf:
                    meta = pq.read_table(mf)
                cols = {"index_id": pa.array(np.arange(offset, offset + meta.num_rows), pa.int64())}
                for f in schema:
                    if f.name == "index_id":
                        continue
                    if f.name in meta.column_names:
                        cols[f.name] = meta.column(f.name).cast(f.type)
                    else:  # e.g. no safety head: the column is null, as in the subset parquet
                        cols[f.name] = pa.nulls(meta.num_rows, f.type)
                writer.write_table(pa.table(cols, schema=schema))
                offset += meta.num_rows
    fs, path = fsio.filesystem(target, storage_options)
    fs.mv(path + ".tmp", path)
    return offset


def apply_index_param(index, index_param: str | None) -> None:
    """Re-apply the search-time parameters autofaiss tuned (nprobe, efSearch...): faiss does not
    store them all in the index file, and without them recall silently drops."""
    if not index_param:
        return
    import faiss

    faiss.ParameterSpace().set_index_parameters(index, index_param)
