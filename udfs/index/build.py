"""Build the image and text kNN indices of one subset (autofaiss, or the recall-first index).

No pyspark import here: the distributed build receives autofaiss's own flag and autofaiss finds
the active session itself. Which index is kept is decided in udfs/index/tuning.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

from udfs import fsio
from udfs.index import layout, tuning

log = logging.getLogger(__name__)


def build_kind_index(emb_folder: str, index_path: str, infos_path: str,
                     params: tuning.BuildParams) -> dict:
    """autofaiss `build_index` over one folder of npy files, written to local paths."""
    from autofaiss import build_index

    kwargs: dict[str, Any] = dict(
        embeddings=fsio.normalize_uri(emb_folder), index_path=index_path,
        index_infos_path=infos_path, save_on_disk=True, file_format="npy",
        max_index_query_time_ms=float(params.max_index_query_time_ms),
        max_index_memory_usage=str(params.max_index_memory_usage),
        current_memory_available=str(params.current_memory_available),
        min_nearest_neighbors_to_retrieve=int(params.min_nearest_neighbors_to_retrieve),
        metric_type=params.metric_type, nb_cores=params.nb_cores,
        should_be_memory_mappable=bool(params.memory_mapped or params.distributed),
        index_key=params.index_key, index_param=params.index_param,
        verbose=logging.WARNING)
    tmp = None
    if params.distributed:
        tmp = fsio.join(params.temporary_indices_folder or tempfile.mkdtemp(prefix="clipcrawl-dist-"),
                        os.path.splitext(os.path.basename(index_path))[0])
        kwargs["distributed"] = "pyspark"
        kwargs["temporary_indices_folder"] = fsio.normalize_uri(tmp)
    t0 = time.time()
    try:
        _, infos = build_index(**kwargs)
    finally:
        if tmp is not None and fsio.exists(tmp):
            fs, path = fsio.filesystem(tmp)
            fs.rm(path, recursive=True)
    if not os.path.exists(index_path):
        raise RuntimeError(f"autofaiss did not write {index_path} (see its log above)")
    infos = dict(infos or {})
    infos["build_seconds"] = round(time.time() - t0, 3)
    return infos


def build_tuned_kind_index(emb_folder: str, parts: list[layout.EmbeddingPart], kind: str,
                           local_index: str, local_infos: str, params: tuning.BuildParams,
                           storage_options: dict | None = None) -> dict:
    """One kind's index at `local_index`, chosen by measured recall within the query-time cap.

    `recall_first` (default): the exhaustive fast-scan PQ index with exact re-ranking is built
    first (seconds, one pass over the parts) and kept when it reaches `min_recall` within the cap;
    autofaiss (whose HNSW build and timing-based efSearch search cost minutes at 1M vectors and
    still missed 0.95 on structureless vectors) runs only when it does not. `autofaiss_first`:
    autofaiss's index, its search parameters widened to `min_recall`, then that fallback.
    """
    import faiss

    total = sum(p.rows for p in parts)
    queries, exact, seconds = tuning.recall_ground_truth(parts, kind, params.recall_sample, params.recall_k,
                                                  params.seed, params.metric_type, storage_options)
    attempt = None
    if params.strategy == "recall_first":
        attempt = tuning.recall_first(parts, kind, queries, exact, local_index, params, storage_options)
        if "chosen_by" in attempt:
            attempt["recall_exact_seconds"] = round(seconds, 3)
            return attempt
    kind_infos = build_kind_index(emb_folder, local_index, local_infos, params)
    index = faiss.read_index(local_index)
    if index.ntotal != total:
        raise RuntimeError(f"{kind} index holds {index.ntotal} vectors, expected {total}")
    dim = int(index.d)
    layout.apply_index_param(index, kind_infos.get("index_param"))
    kind_infos.update(tuning.tune_recall(index, queries, exact, params.recall_k, params.min_recall,
                                  params.recall_tuning_steps, kind_infos.get("index_param"),
                                  params.recall_tuning_max_query_ms,
                                  vectors=tuning.part_vectors_of(parts, kind, storage_options)))
    kind_infos["recall_exact_seconds"] = round(seconds, 3)
    del index  # before the fallback holds its own copy of the vectors
    kind_infos.pop("index_path", None)  # the scratch path, meaningless after the copy
    if attempt is not None:
        kind_infos["recall_first"] = attempt
    recall = kind_infos.get(f"recall@{params.recall_k}")
    if params.min_recall is not None and recall is not None and recall < params.min_recall:
        if attempt is not None and attempt.get("status") == "not kept":
            # the same index, already measured: it would only win on recall within the cap
            better = (attempt.get("within_cap") and attempt.get(f"recall@{params.recall_k}", 0) > recall)
            if not better:
                kind_infos["recall_fallback"] = {"status": "not better", "reason": "measured by recall_first"}
                kind_infos["dim"] = dim
                return kind_infos
        kind_infos = tuning.recall_fallback(parts, kind, dim, queries, exact, local_index, kind_infos,
                                     params, storage_options)
    kind_infos["dim"] = dim
    return kind_infos


def build_subset(subset_root: str, output: str, params: tuning.BuildParams,
                 storage_options: dict | None = None) -> dict:
    """Build the image and text indices, the ids parquet and index_infos.json of one subset.

    autofaiss writes local files, so the indices are built in a local scratch folder and copied
    to `output` (local or s3://) afterwards; index_infos.json is written last and marks the subset
    complete.
    """
    parts = layout.list_parts(subset_root, storage_options)
    total = sum(p.rows for p in parts)
    infos: dict[str, Any] = {"subset_root": subset_root, "nb_vectors": total, "parts": len(parts),
                             "recall_k": params.recall_k,
                             "metric_type": params.metric_type, "memory_mapped": params.memory_mapped,
                             "distributed": params.distributed, "indices": {}}
    if total == 0:
        infos["status"] = "empty"
        fsio.write_json(fsio.join(output, layout.INFOS_FILE), infos, storage_options)
        return infos
    infos["nb_ids"] = layout.write_ids(parts, fsio.join(output, layout.IDS_FILE), storage_options)
    scratch = tempfile.mkdtemp(prefix="clipcrawl-index-")
    try:
        for kind, (folder, _) in layout.KINDS.items():
            local_index = os.path.join(scratch, layout.INDEX_FILES[kind])
            local_infos = os.path.join(scratch, f"{kind}_autofaiss_infos.json")
            log.info("building the %s index of %s (%d vectors)", kind, subset_root, total)
            kind_infos = build_tuned_kind_index(fsio.join(subset_root, folder), parts, kind,
                                                local_index, local_infos, params, storage_options)
            kind_infos["index_file"] = layout.INDEX_FILES[kind]
            _upload(local_index, fsio.join(output, layout.INDEX_FILES[kind]), storage_options)
            infos["indices"][kind] = kind_infos
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    infos["status"] = "ok"
    fsio.write_json(fsio.join(output, layout.INFOS_FILE), infos, storage_options)
    return infos


def _upload(local: str, target: str, storage_options: dict | None) -> None:
    if not fsio.is_remote(target):
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        shutil.copyfile(local, target + ".tmp")
        os.replace(target + ".tmp", target)
        return
    fs, path = fsio.filesystem(target, storage_options)
    fs.put_file(local, path)
