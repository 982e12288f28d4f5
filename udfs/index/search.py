"""Load built kNN indices (local or remote, optionally memory-mapped) and search them by vector,
text or image; the query encoder turns a text or an image into a CLIP vector.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile

import numpy as np

from udfs import fsio
from udfs.index import layout

log = logging.getLogger(__name__)


def _local_copy(uri: str, cache_dir: str | None, storage_options: dict | None) -> str:
    if not fsio.is_remote(uri):
        return fsio.normalize_uri(uri)
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="clipcrawl-index-cache-")
    os.makedirs(cache_dir, exist_ok=True)
    local = os.path.join(cache_dir, uri.replace("://", "_").replace("/", "_"))
    fs, path = fsio.filesystem(uri, storage_options)
    # A rebuilt index at the same URI must not be served from a stale copy: compare sizes.
    if not os.path.exists(local) or os.path.getsize(local) != fs.size(path):
        fs.get_file(path, local + ".part")
        os.replace(local + ".part", local)
    return local


def read_faiss_index(path: str, memory_mapped: bool = False):
    """Read an index; memory-mapped when asked and the index type allows it (IVF indices built
    with `index.memory_mapped`), else read in memory with a log line saying so."""
    import faiss

    if memory_mapped:
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            if faiss.try_extract_index_ivf(index) is None:  # faiss reads the rest into RAM
                log.warning("%s is not an IVF index, so it is read into memory, not memory-mapped "
                            "(build with index.memory_mapped=true for a mappable index)", path)
            return index
        except RuntimeError as exc:
            log.warning("%s cannot be memory-mapped (%s); reading it into memory",
                        path, str(exc).splitlines()[0][:200])
    return faiss.read_index(path)


def contiguous(table):
    """One chunk per column, strings as large_string (64-bit offsets, so no 2 GB limit).

    Table.take on a chunked table concatenates the chunks first: with the ids parquet's row groups
    that was ~9 ms per lookup at 1M rows, more than the search itself; on one chunk it is 0.1 ms."""
    import pyarrow as pa

    fields = [f.with_type(pa.large_string()) if pa.types.is_string(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields, table.schema.metadata)).combine_chunks()


class SubsetIndex:
    """One subset's image and text indices plus the id -> metadata table."""

    def __init__(self, name: str, folder: str, memory_mapped: bool = False,
                 cache_dir: str | None = None, storage_options: dict | None = None):
        import pyarrow.parquet as pq

        self.name = name
        self.folder = folder
        infos_uri = fsio.join(folder, layout.INFOS_FILE)
        if not fsio.exists(infos_uri, storage_options):
            raise layout.QueryError(f"{folder} is not a built index (no {layout.INFOS_FILE})")
        self.infos = fsio.read_json(infos_uri, storage_options)
        self.indices = {}
        if self.infos.get("status") == "empty":
            self.ids = None
            return
        for kind, file in layout.INDEX_FILES.items():
            local = _local_copy(fsio.join(folder, file), cache_dir, storage_options)
            index = read_faiss_index(local, memory_mapped)
            layout.apply_index_param(index, self.infos["indices"][kind].get("index_param"))
            self.indices[kind] = index
        with fsio.open_uri(fsio.join(folder, layout.IDS_FILE), "rb", storage_options) as fh:
            self.ids = contiguous(pq.read_table(fh))

    @property
    def size(self) -> int:
        return 0 if self.ids is None else self.ids.num_rows

    @property
    def dim(self) -> int | None:
        index = self.indices.get("image")
        return int(index.d) if index is not None else None

    def search(self, vector: np.ndarray, modality: str = "image", k: int = 10) -> list[dict]:
        """Top-k rows of the `modality` index for one query vector, best first, with metadata."""
        if modality not in layout.INDEX_FILES:
            raise layout.QueryError(f"modality must be 'image' or 'text', got {modality!r}")
        if self.size == 0:
            return []
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise layout.QueryError(f"query vector has dimension {vector.shape[1]}, index {self.name!r} "
                             f"has {self.dim}")
        if not np.all(np.isfinite(vector)):
            raise layout.QueryError("query vector has non-finite values")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise layout.QueryError("query vector is all zeros")
        vector = vector / norm
        # Search at least at the k whose recall was measured: a re-ranking index's candidate pool is
        # k x k_factor_rf, so k=1 would otherwise re-rank 32 candidates instead of the 320 tuned.
        tuned_k = int(self.infos.get("recall_k") or 10)
        want = int(min(k, self.size))
        scores, ids = self.indices[modality].search(vector, int(min(max(want, tuned_k), self.size)))
        scores, ids = scores[:, :want], ids[:, :want]
        keep = ids[0] >= 0
        return self.lookup(ids[0][keep], scores[0][keep])

    def lookup(self, ids: np.ndarray, scores: np.ndarray | None = None) -> list[dict]:
        import pyarrow as pa

        if len(ids) == 0:
            return []
        rows = self.ids.take(pa.array(np.asarray(ids, dtype=np.int64))).to_pylist()
        if scores is not None:
            for row, score in zip(rows, scores):
                row["score"] = float(score)
        return rows


def open_indices(root: str, memory_mapped: bool = False, cache_dir: str | None = None,
                 storage_options: dict | None = None) -> dict[str, SubsetIndex]:
    """Load `<root>` as one subset index (it has index_infos.json) or as a folder of subsets."""
    if fsio.exists(fsio.join(root, layout.INFOS_FILE), storage_options):
        name = posixpath.basename(fsio.normalize_uri(root).rstrip("/"))
        return {name: SubsetIndex(name, root, memory_mapped, cache_dir, storage_options)}
    if not fsio.exists(root, storage_options):
        raise layout.QueryError(f"index folder {root} does not exist")
    fs, path = fsio.filesystem(root, storage_options)
    out = {}
    for sub in sorted(fs.ls(path, detail=False)):
        name = posixpath.basename(sub.rstrip("/"))
        folder = fsio.join(root, name)
        if fs.isdir(sub) and fsio.exists(fsio.join(folder, layout.INFOS_FILE), storage_options):
            out[name] = SubsetIndex(name, folder, memory_mapped, cache_dir, storage_options)
    if not out:
        raise layout.QueryError(f"no built index under {root} (no */{layout.INFOS_FILE})")
    return out


class QueryEncoder:
    """Embeds text and image queries with the same CLIP config as clip-score (`clip:` section),
    loading the model on first use so a server answering embedding queries never needs it."""

    def __init__(self, clip_section: dict, storage_options: dict | None = None):
        self.clip = dict(clip_section)
        self.storage_options = storage_options   # for s3:// checkpoints and local-dir models
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from udfs.clip.clip_model import load_clip

            self._model = load_clip(self.clip.get("model"), self.clip.get("pretrained"),
                                    device=self.clip.get("device", "auto"),
                                    precision=self.clip.get("precision", "auto"),
                                    storage_options=self.storage_options)
        return self._model

    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.model.encode_texts([text]), dtype=np.float32)[0]

    def encode_image(self, image) -> np.ndarray:
        return np.asarray(self.model.encode_images([image.convert("RGB")]), dtype=np.float32)[0]
