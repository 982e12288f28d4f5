"""The stored CLIP embedding of one indexed row, for "search similar".

Exact vectors come from the subset's embeddings npy files (the `subset_root` that build-index
recorded in index_infos.json, read with one ranged read per row, so s3 works too). When that
folder is gone or no longer matches the index (moved, rebuilt), the vector is reconstructed
from the faiss index instead: exact for flat/HNSW/refined indices, a PQ approximation otherwise,
which still finds the same neighbourhood.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from udfs import fsio
from udfs.index import layout as index_layout
from udfs.index import search

log = logging.getLogger(__name__)


class RowVectors:
    def __init__(self, storage_options: dict | None = None):
        self.storage_options = storage_options
        self._parts: dict[tuple[str, str], list | None] = {}
        self._lock = threading.Lock()

    def _layout(self, subset: search.SubsetIndex) -> list | None:
        """[(first id, rows, npy uri per kind)] when the embeddings folder matches the index."""
        key = (subset.name, subset.folder)
        with self._lock:
            if key in self._parts:
                return self._parts[key]
        layout = None
        root = subset.infos.get("subset_root")
        if root:
            try:
                parts = index_layout.list_parts(root, self.storage_options)
                if sum(p.rows for p in parts) == subset.size:
                    offset, layout = 0, []
                    for p in parts:
                        layout.append((offset, p.rows, {"image": p.image_npy, "text": p.text_npy}))
                        offset += p.rows
                else:
                    log.warning("%s has %d rows, the index %d: search similar uses the index's vectors",
                                root, sum(p.rows for p in parts), subset.size)
            except (index_layout.EmbeddingLayoutError, OSError, ValueError) as exc:
                log.warning("embeddings of %s not readable (%s): search similar uses the index's vectors",
                            subset.name, exc)
        with self._lock:
            self._parts[key] = layout
        return layout

    def _from_npy(self, uri: str, row: int) -> np.ndarray:
        with fsio.open_uri(uri, "rb", self.storage_options) as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            if fortran or len(shape) != 2:
                raise ValueError(f"{uri}: not a C-ordered 2-d array")
            dim = int(shape[1])
            fh.seek(fh.tell() + row * dim * dtype.itemsize)
            data = fh.read(dim * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype).astype(np.float32)

    def _from_index(self, subset: search.SubsetIndex, modality: str, index_id: int) -> np.ndarray:
        import faiss

        index = subset.indices[modality]
        with self._lock:
            try:
                return np.asarray(index.reconstruct(int(index_id)), dtype=np.float32)
            except RuntimeError:
                ivf = faiss.try_extract_index_ivf(index)
                if ivf is None:
                    raise
                ivf.make_direct_map()   # IVF lists know no id -> position map until asked
                return np.asarray(index.reconstruct(int(index_id)), dtype=np.float32)

    def vector(self, subset: search.SubsetIndex, index_id: int, modality: str = "image") -> tuple[np.ndarray, str]:
        """(unit vector, where it came from: 'embeddings' or 'index')."""
        layout = self._layout(subset)
        vec, source = None, "embeddings"
        if layout:
            for first, rows, uris in layout:
                if first <= index_id < first + rows:
                    try:
                        vec = self._from_npy(uris[modality], index_id - first)
                    except (OSError, ValueError) as exc:
                        log.warning("reading row %d of %s failed: %s", index_id, uris[modality], exc)
                    break
        if vec is None:
            vec, source = self._from_index(subset, modality, index_id), "index"
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm else vec), source
