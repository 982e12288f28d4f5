"""Take published items out of everything under a pipeline root (no Spark here).

A removal list holds one entry per line: a URL, `sample_id:<int>`, `sha256:<hex>` (of the original
image bytes) or `domain:<host>` (the host and its subdomains); `#` starts a comment. `sha256`
entries are resolved to the pairs whose download metadata holds that digest, so every other file
can be matched by URL, uid / SAMPLE_ID or host alone.

What a match does, by file:
- download metadata (`<images>/{shard}.parquet`): the row stays as a tombstone, status
  `taken_down`, with its key, uid, url and shard and nothing else (no caption, no bytes);
- the download stage's inputs (`wat_pairs`, `pairs_dedup`): the row stays with its uid and url
  but without caption or page URL, so a rerun of `download` plans the same shards and keys;
- any other parquet (subsets, `scored`, rejected datasets): the row is deleted;
- tar shards: the sample's members (`KEY.jpg/.txt/.json`) are dropped;
- clip-retrieval layouts (`img_emb/`, `text_emb/`, `metadata/`): the three files of a part are
  rewritten with the same rows dropped, so they stay row-aligned;
- kNN indices: faiss `remove_ids` where the type compacts ids or keeps them in inverted lists
  (these are renumbered so that index id = row of the ids parquet again), else a rebuild from the
  index's own reconstructed vectors; the ids parquet and index_infos.json follow.

Safe to kill: every new file is written beside its original (`.<name>.takedown-<run>`), then a
journal listing the swaps is written, then the swaps run. A run killed before the journal leaves
only originals (its staged files are deleted by the next run); killed during the swaps, the next
run finishes them from the journal. Each file is at every moment the old one or the new one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from udfs import fsio
from udfs.download.block_list import (
    TAKEDOWN_DIR,
    Entry,
    Matcher,
    block_store_uri,
    load_block_list,
    read_list,
    sample_id_of_uid,
    uid_of_sample_id,
)

log = logging.getLogger(__name__)

STATUS = "taken_down"
REMOVAL_LIST = "removal_list.txt"
TMP_MARK = ".takedown-"
# Columns a tombstone keeps: they identify the item (and, for download metadata, its place in the
# shard plan) without holding its content.
IDENTITY_COLUMNS = ("key", "uid", "url", "shard", "source_file", "record_id", "record_date", "crawl")
_SHARD_FILE = re.compile(r"^\d+\.parquet$")
_PART_FILE = re.compile(r"^metadata_(\d+)\.parquet$")


class TakedownError(RuntimeError):
    """Something under the root is inconsistent in a way a takedown must not paper over."""


# --- what a row is matched by ---------------------------------------------------------------

MATCH_COLUMNS = ("url", "URL", "uid", "SAMPLE_ID", "hash", "sha256")


def matchable(table) -> bool:
    return bool(set(table.column_names) & set(MATCH_COLUMNS))


def _in_block_list(matcher: Matcher, e: Entry) -> bool:
    if e.kind == "url":
        return e.value in matcher.urls
    if e.kind == "sample_id":
        return uid_of_sample_id(int(e.value)) in matcher.uids
    return e.value in (matcher.sha256 if e.kind == "sha256" else matcher.domains)


def _list_text(entries: Iterable[Entry]) -> bytes:
    return ("".join(e.text + "\n" for e in entries)).encode("utf-8")


# --- files under the root ------------------------------------------------------------------------

def _list_files(root: str, storage_options: dict | None) -> list[str]:
    fs, path = fsio.filesystem(root, storage_options)
    if not fs.exists(path):
        raise TakedownError(f"{root} does not exist")
    found = fs.find(path)
    if fsio.is_remote(root):
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return sorted(f"{protocol}://{p.lstrip('/')}" for p in found)
    return sorted(found)


def _rel(root: str, uri: str) -> str:
    base = fsio.normalize_uri(root).rstrip("/")
    uri = fsio.normalize_uri(uri)
    return uri[len(base) + 1:] if uri.startswith(base + "/") else uri


def _read_bytes(uri: str, so: dict | None) -> bytes:
    with fsio.open_uri(uri, "rb", so) as fh:
        return fh.read()


def _read_parquet(uri: str, so: dict | None):
    import pyarrow.parquet as pq

    data = _read_bytes(uri, so)
    pf = pq.ParquetFile(io.BytesIO(data))
    compression = "zstd"
    if pf.metadata.num_row_groups and pf.metadata.num_columns:
        compression = pf.metadata.row_group(0).column(0).compression.lower()
        if compression in ("uncompressed", "unknown"):
            compression = "none"
    return pf.read(), compression


def _parquet_bytes(table, compression: str = "zstd") -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()


@dataclass
class Staged:
    """The new files of one change, written beside their originals, and what it removed."""
    swaps: list[tuple[str, str]] = field(default_factory=list)   # (staged, destination)
    report: dict = field(default_factory=dict)


class Stager:
    def __init__(self, run_id: str, storage_options: dict | None):
        self.run_id, self.so = run_id, storage_options

    def tmp_path(self, dest: str) -> str:
        folder, name = posixpath.split(fsio.normalize_uri(dest)) if fsio.is_remote(dest) else os.path.split(dest)
        return fsio.join(folder, f".{name}{TMP_MARK}{self.run_id}")

    def write(self, staged: Staged, dest: str, data: bytes) -> None:
        tmp = self.tmp_path(dest)
        with fsio.open_uri(tmp, "wb", self.so) as fh:
            fh.write(data)
            if not fsio.is_remote(tmp):
                fh.flush()
                os.fsync(fh.fileno())
        staged.swaps.append((tmp, dest))

    def put_local(self, staged: Staged, dest: str, local: str) -> None:
        tmp = self.tmp_path(dest)
        if fsio.is_remote(tmp):
            fs, path = fsio.filesystem(tmp, self.so)
            fs.put_file(local, path)
        else:
            shutil.copyfile(local, tmp)
        staged.swaps.append((tmp, dest))


def swap(tmp: str, dest: str, storage_options: dict | None) -> None:
    """Replace dest by tmp: a rename on local disks; on object stores a copy (one PUT: the
    object is the old or the new one) and a delete of the staged object."""
    if not fsio.is_remote(dest):
        # Hadoop's local filesystem checks a `.name.crc` sibling on read: drop it first (a file
        # without one is read unchecked; a stale one would fail the read).
        folder, name = os.path.split(dest)
        crc = os.path.join(folder, f".{name}.crc")
        if os.path.exists(crc):
            os.remove(crc)
        os.replace(tmp, dest)
        return
    fs, tpath = fsio.filesystem(tmp, storage_options)
    _, dpath = fsio.filesystem(dest, storage_options)
    fs.copy(tpath, dpath)
    fs.rm(tpath)


# --- the rewrites --------------------------------------------------------------------------------

def _tombstone(row: dict, label: str, note: str) -> dict:
    out = {k: (v if k in IDENTITY_COLUMNS else None) for k, v in row.items()}
    if "status" in row:
        out["status"] = STATUS
    if "error_message" in row:
        out["error_message"] = f"{note}: {label}"
    if "retryable" in row:
        out["retryable"] = False
    return out


def _is_tombstone(row: dict) -> bool:
    if "status" in row:
        return row["status"] == STATUS
    content = [k for k in row if k not in IDENTITY_COLUMNS and k != "error_message"]
    return bool(content) and all(row[k] is None for k in content)


def rewrite_parquet(uri: str, matcher: Matcher, tombstone: bool, stager: Stager, note: str,
                    rel: str) -> tuple[Staged | None, dict]:
    """Drop (or tombstone) matching rows of one parquet file. Returns (staged or None, facts),
    facts = {keys: matched shard keys (also of earlier tombstones), uids: removed uids}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    facts: dict[str, Any] = {"keys": set(), "uids": {}}
    with fsio.open_uri(uri, "rb", stager.so) as fh:   # first only the columns that can match
        pf = pq.ParquetFile(fh)
        cols = [c for c in MATCH_COLUMNS if c in pf.schema_arrow.names]
        if not cols or pf.metadata.num_rows == 0:
            return None, facts
        labels = matcher.match_table(pf.read(columns=cols))
    if not any(labels):
        return None, facts
    table, compression = _read_parquet(uri, stager.so)
    rows = table.to_pylist() if tombstone else None
    by_entry: dict[str, int] = {}
    removed = 0
    if tombstone:
        out = []
        for row, label in zip(rows, labels):
            if label is not None:
                if row.get("key"):
                    facts["keys"].add(row["key"])
                if not _is_tombstone(row):
                    if row.get("uid"):
                        facts["uids"][row["uid"]] = label
                    row = _tombstone(row, label, note)
                    removed += 1
                    by_entry[label] = by_entry.get(label, 0) + 1
            out.append(row)
        new = pa.Table.from_pylist(out, schema=table.schema) if removed else None
    else:
        keep = np.array([label is None for label in labels])
        for label in labels:
            if label is not None:
                by_entry[label] = by_entry.get(label, 0) + 1
        removed = int((~keep).sum())
        new = table.filter(pa.array(keep))
        cols = table.column_names
        if "uid" in cols or "SAMPLE_ID" in cols:
            ids = table.column("uid" if "uid" in cols else "SAMPLE_ID").to_pylist()
            for value, label in zip(ids, labels):
                if label is not None and value is not None:
                    facts["uids"][value if "uid" in cols else uid_of_sample_id(value)] = label
    if not removed:
        return None, facts
    staged = Staged(report={"path": rel, "kind": "tombstone" if tombstone else "parquet",
                            "rows_before": table.num_rows,
                            "rows_after": table.num_rows - (0 if tombstone else removed),
                            "removed": removed, "by_entry": by_entry})
    stager.write(staged, uri, _parquet_bytes(new, compression))
    return staged, facts


def tar_member_keys(uri: str, so: dict | None) -> set[str]:
    """Sample keys of a tar from its headers (data is skipped with seeks)."""
    from udfs.download.shard_writer import split_key

    with fsio.open_uri(uri, "rb", so) as fh:
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            return {split_key(m.name)[0] for m in tar if m.isfile()}


def rewrite_tar(uri: str, drop_keys: dict[str, str], matcher: Matcher, stager: Stager, rel: str) -> Staged | None:
    """Copy a tar without the samples whose key is in drop_keys or whose .json member matches.
    Members of a sample are grouped by key (consecutive, as webdataset writes them)."""
    from udfs.download.shard_writer import split_key

    tmp = stager.tmp_path(uri)
    removed: dict[str, str] = {}
    members_removed = 0
    kept = 0

    def decide(group: list[tuple[tarfile.TarInfo, bytes]], key: str) -> str | None:
        if key in drop_keys:
            return drop_keys[key]
        for info, data in group:
            if info.name.endswith(".json"):
                try:
                    meta = json.loads(data.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    return None
                if isinstance(meta, dict):
                    return matcher.match(meta.get("url"), meta.get("uid"), meta.get("sha256"))
        return None

    with fsio.open_uri(uri, "rb", stager.so) as src, fsio.open_uri(tmp, "wb", stager.so) as dst:
        with tarfile.open(fileobj=src, mode="r|") as tin, \
                tarfile.open(fileobj=dst, mode="w|", format=tarfile.USTAR_FORMAT) as tout:
            group: list[tuple[tarfile.TarInfo, bytes]] = []
            current = None

            def flush():
                nonlocal members_removed, kept
                if not group:
                    return
                label = decide(group, current)
                if label is not None:
                    removed[current] = label
                    members_removed += len(group)
                    return
                for info, data in group:
                    tout.addfile(info, io.BytesIO(data))
                kept += 1

            for member in tin:
                if not member.isfile():
                    continue
                key = split_key(member.name)[0]
                if key != current:
                    flush()
                    group, current = [], key
                group.append((member, tin.extractfile(member).read()))
            flush()
    if not removed:
        fs, path = fsio.filesystem(tmp, stager.so)
        fs.rm(path)
        return None
    by_entry: dict[str, int] = {}
    for label in removed.values():
        by_entry[label] = by_entry.get(label, 0) + 1
    return Staged(swaps=[(tmp, uri)], report={
        "path": rel, "kind": "tar", "samples_removed": len(removed), "members_removed": members_removed,
        "samples_after": kept, "keys": sorted(removed), "by_entry": by_entry, "removed": len(removed)})


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def rewrite_embedding_part(layout: str, number: str, matcher: Matcher, stager: Stager,
                           root: str) -> tuple[Staged | None, np.ndarray | None, int]:
    """One (img_emb, text_emb, metadata) part: the same rows dropped from all three.
    Returns (staged or None, removed row positions, rows before)."""
    import pyarrow as pa

    meta_uri = fsio.join(layout, "metadata", f"metadata_{number}.parquet")
    img_uri = fsio.join(layout, "img_emb", f"img_emb_{number}.npy")
    text_uri = fsio.join(layout, "text_emb", f"text_emb_{number}.npy")
    table, compression = _read_parquet(meta_uri, stager.so)
    labels = matcher.match_table(table) if matchable(table) else [None] * table.num_rows
    gone = np.array([lab is not None for lab in labels], dtype=bool)
    if not gone.any():
        return None, np.zeros(0, np.int64), table.num_rows
    arrays = {}
    for name, uri in (("img_emb", img_uri), ("text_emb", text_uri)):
        if not fsio.exists(uri, stager.so):
            continue
        arr = np.load(io.BytesIO(_read_bytes(uri, stager.so)), allow_pickle=False)
        if len(arr) != table.num_rows:
            raise TakedownError(f"{uri} has {len(arr)} rows but {meta_uri} has {table.num_rows}: "
                                "the layout is not row-aligned, nothing was changed")
        arrays[name] = (uri, arr[~gone])
    by_entry: dict[str, int] = {}
    for lab in labels:
        if lab is not None:
            by_entry[lab] = by_entry.get(lab, 0) + 1
    staged = Staged(report={"path": _rel(root, meta_uri), "kind": "embeddings",
                            "files": [_rel(root, u) for u, _ in arrays.values()] + [_rel(root, meta_uri)],
                            "rows_before": table.num_rows, "rows_after": int((~gone).sum()),
                            "removed": int(gone.sum()), "by_entry": by_entry})
    for uri, arr in arrays.values():
        stager.write(staged, uri, _npy_bytes(arr))
    # the metadata last, as write_retrieval_part does
    stager.write(staged, meta_uri, _parquet_bytes(table.filter(pa.array(~gone)), compression))
    return staged, np.flatnonzero(gone), table.num_rows


def _ivf_renumber(ivf, mapping: np.ndarray) -> None:
    """After remove_ids an IVF index keeps the old ids in its lists: map them to 0..n-1."""
    import faiss

    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size).copy()
        new = np.ascontiguousarray(mapping[ids], dtype=np.int64)
        if (new < 0).any():
            raise TakedownError("a removed id is still in the index after remove_ids")
        invlists.update_entries(lst, 0, n, faiss.swig_ptr(new), faiss.swig_ptr(codes))


def remove_from_index(index, remove: np.ndarray, index_key: str | None = None):
    """(index without the `remove` ids, renumbered 0..n-1 in the old order, method).

    Flat-code indices (Flat, PQ, SQ) compact on remove_ids; IVF indices (in memory) keep their
    ids, which are renumbered; others (HNSW, fast-scan PQ, re-ranking) cannot remove and are
    rebuilt with the same factory string from their own reconstructed vectors."""
    import faiss

    n0 = int(index.ntotal)
    remove = np.unique(np.asarray(remove, dtype=np.int64))
    if len(remove) and (remove[0] < 0 or remove[-1] >= n0):
        raise TakedownError(f"ids to remove fall outside the index (ntotal {n0})")
    keep = np.ones(n0, dtype=bool)
    keep[remove] = False
    mapping = np.full(n0, -1, dtype=np.int64)
    mapping[keep] = np.arange(int(keep.sum()))
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer
    ivf = faiss.try_extract_index_ivf(index)
    method = None
    if ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        dm = ivf.direct_map.type
        if dm != faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        index.remove_ids(remove)
        _ivf_renumber(ivf, mapping)
        if dm != faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(dm)
        method = "remove_ids (ivf, ids renumbered)"
    elif ivf is None and isinstance(inner, faiss.IndexFlatCodes):
        index.remove_ids(remove)
        method = "remove_ids"
    else:
        if not index_key:
            raise TakedownError(f"{type(inner).__name__} cannot remove ids and index_infos.json "
                                "names no index_key to rebuild it with")
        try:
            vectors = index.reconstruct_n(0, n0)
        except RuntimeError as exc:
            raise TakedownError(f"{type(inner).__name__} can neither remove ids nor reconstruct its "
                                f"vectors for a rebuild: {str(exc).splitlines()[0][:200]}") from exc
        vectors = np.ascontiguousarray(vectors[keep], dtype=np.float32)
        index = faiss.index_factory(int(index.d), index_key, index.metric_type)
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        method = f"rebuild ({index_key})"
    if int(index.ntotal) != n0 - len(remove):
        raise TakedownError(f"index holds {index.ntotal} vectors after removing {len(remove)} of {n0}")
    return index, method


def rewrite_index_folder(folder: str, matcher: Matcher, stager: Stager, root: str,
                         run_id: str) -> tuple[Staged | None, dict]:
    """ids.parquet, image/text.index and index_infos.json of one subset's indices."""
    import faiss
    import pyarrow as pa

    from udfs.index import layout as index_layout

    so = stager.so
    ids_uri = fsio.join(folder, index_layout.IDS_FILE)
    infos_uri = fsio.join(folder, index_layout.INFOS_FILE)
    table, compression = _read_parquet(ids_uri, so)
    labels = matcher.match_table(table)
    gone = np.array([lab is not None for lab in labels], dtype=bool)
    facts = {"subset_root": None, "removed_ids": np.zeros(0, np.int64), "rows_before": table.num_rows}
    if not gone.any():
        return None, facts
    index_ids = table.column("index_id").to_numpy()
    if not np.array_equal(index_ids, np.arange(table.num_rows)):
        raise TakedownError(f"{ids_uri}: index_id is not the row number; nothing was changed")
    removed_ids = np.flatnonzero(gone)
    infos = fsio.read_json(infos_uri, so)
    facts.update(subset_root=infos.get("subset_root"), removed_ids=removed_ids)
    by_entry: dict[str, int] = {}
    for lab in labels:
        if lab is not None:
            by_entry[lab] = by_entry.get(lab, 0) + 1
    report: dict[str, Any] = {"path": _rel(root, folder), "kind": "index", "removed": int(gone.sum()),
                              "rows_before": table.num_rows, "rows_after": int((~gone).sum()),
                              "by_entry": by_entry, "indices": {}}
    staged = Staged(report=report)
    scratch = tempfile.mkdtemp(prefix="clipcrawl-takedown-")
    try:
        for kind, file in index_layout.INDEX_FILES.items():
            uri = fsio.join(folder, file)
            if not fsio.exists(uri, so):
                continue
            local = os.path.join(scratch, file)
            with open(local, "wb") as fh:
                fh.write(_read_bytes(uri, so))
            index = faiss.read_index(local)
            before = int(index.ntotal)
            if before != table.num_rows:
                raise TakedownError(f"{uri} holds {before} vectors but {ids_uri} has {table.num_rows} rows")
            kind_infos = (infos.get("indices") or {}).get(kind) or {}
            new, method = remove_from_index(index, removed_ids, kind_infos.get("index_key"))
            faiss.write_index(new, local + ".new")
            stager.put_local(staged, uri, local + ".new")
            report["indices"][kind] = {"file": _rel(root, uri), "ntotal_before": before,
                                       "ntotal_after": int(new.ntotal), "method": method}
            if kind_infos:
                if "nb vectors" in kind_infos:
                    kind_infos["nb vectors"] = int(new.ntotal)
                kind_infos.setdefault("takedowns", []).append({"run": run_id, "method": method,
                                                              "removed": int(gone.sum())})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    kept = table.filter(pa.array(~gone))
    kept = kept.set_column(kept.schema.get_field_index("index_id"), kept.schema.field("index_id"),
                           pa.array(np.arange(kept.num_rows), pa.int64()))
    stager.write(staged, ids_uri, _parquet_bytes(kept, compression))
    for key in ("nb_vectors", "nb_ids"):
        if key in infos:
            infos[key] = kept.num_rows
    if kept.num_rows == 0:
        infos["status"] = "empty"
    stager.write(staged, infos_uri, (json.dumps(infos, indent=2, sort_keys=True, default=str) + "\n").encode())
    return staged, facts


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Layout:
    """What lives where under the root, from one listing."""
    shard_parquet: list[str] = field(default_factory=list)   # download metadata (tombstoned)
    tars: list[str] = field(default_factory=list)
    parquet: list[tuple[str, bool]] = field(default_factory=list)   # (uri, tombstone)
    parts: list[tuple[str, str]] = field(default_factory=list)      # (layout folder, number)
    index_folders: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)                   # staged files of killed runs


def scan(root: str, storage_options: dict | None, tombstone_dirs: Iterable[str] = ()) -> Layout:
    files = _list_files(root, storage_options)
    names = {_rel(root, f) for f in files}
    tomb = tuple(d.strip("/") + "/" for d in tombstone_dirs)
    out = Layout()
    for uri in files:
        rel = _rel(root, uri)
        base = posixpath.basename(rel)
        folder = posixpath.dirname(rel)
        if rel.startswith(TAKEDOWN_DIR + "/"):
            continue
        if TMP_MARK in base:
            out.stale.append(uri)
            continue
        if base.startswith((".", "_")) or base.endswith(".crc"):
            continue
        if base.endswith(".tar"):
            out.tars.append(uri)
        elif base == "ids.parquet" and posixpath.join(folder, "index_infos.json") in names:
            out.index_folders.append(uri[:-len("/ids.parquet")])
        elif base.endswith(".parquet"):
            m = _PART_FILE.match(base)
            layout = posixpath.dirname(folder)
            if (m and posixpath.basename(folder) == "metadata"
                    and posixpath.join(layout, "img_emb", f"img_emb_{m.group(1)}.npy") in names):
                out.parts.append((uri[:-len("/metadata/" + base)], m.group(1)))
            elif _SHARD_FILE.match(base) and posixpath.join(folder, base[:-8] + ".tar") in names:
                out.shard_parquet.append(uri)
            else:
                out.parquet.append((uri, rel.startswith(tomb)))
    return out


def _resolve_sha256(layout: Layout, matcher: Matcher, storage_options: dict | None,
                    pool: ThreadPoolExecutor) -> dict[str, list[int]]:
    """sha256 entries -> the uids of pairs whose download metadata holds that digest; those
    uids are added to the matcher, labelled with the sha256 entry."""
    if not matcher.sha256:
        return {}
    import pyarrow.parquet as pq

    def one(uri):
        with fsio.open_uri(uri, "rb", storage_options) as fh:
            pf = pq.ParquetFile(fh)   # not pq.read_table: it imports pyarrow.dataset (~2 s cold)
            if not {"sha256", "uid"} <= set(pf.schema_arrow.names):
                return []
            table = pf.read(columns=["sha256", "uid"])
        return [(s, u) for s, u in zip(table.column("sha256").to_pylist(), table.column("uid").to_pylist())
                if s in matcher.sha256 and u]

    # the download metadata holds every digest; without it (a copy of the subsets only) all parquet
    candidates = layout.shard_parquet or [u for u, _ in layout.parquet]
    resolved: dict[str, set[str]] = {}
    for pairs in pool.map(one, candidates):
        for sha, uid in pairs:
            resolved.setdefault(sha, set()).add(uid)
    for sha, uids in resolved.items():
        for uid in uids:
            matcher.uids.setdefault(uid, f"sha256:{sha}")
    return {f"sha256:{sha}": sorted(sample_id_of_uid(u) for u in uids) for sha, uids in resolved.items()}


def _guard(root: str, uri: str, fn: Callable, *args):
    """Run one file's rewrite; a failure names the file (and stops the run before any swap)."""
    try:
        return fn(*args)
    except TakedownError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable or damaged file
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise TakedownError(f"{_rel(root, uri)}: {type(exc).__name__}: {detail}") from exc


def _discard_staged(root: str, run_id: str, so: dict | None) -> None:
    for uri in _list_files(root, so):
        if posixpath.basename(uri).endswith(f"{TMP_MARK}{run_id}"):
            fs, path = fsio.filesystem(uri, so)
            fs.rm(path)


def _journal_uri(root: str, run_id: str) -> str:
    return fsio.join(root, TAKEDOWN_DIR, f"pending-{run_id}.json")


def recover(root: str, storage_options: dict | None) -> list[str]:
    """Finish the swaps of a takedown killed after its journal was written (roll forward)."""
    done = []
    for journal in fsio.expand([fsio.join(root, TAKEDOWN_DIR, "pending-*.json")], storage_options):
        plan = fsio.read_json(journal, storage_options)
        for tmp, dest in plan["swaps"]:
            if fsio.exists(tmp, storage_options):
                swap(tmp, dest, storage_options)
        record = plan["record"]
        record["recovered_at"] = _utc_now()
        fsio.write_json(fsio.join(root, TAKEDOWN_DIR, f"{plan['run_id']}.json"), record, storage_options)
        fs, path = fsio.filesystem(journal, storage_options)
        fs.rm(path)
        log.warning("takedown %s had been killed during its swaps: finished them from %s",
                    plan["run_id"], journal)
        done.append(plan["run_id"])
    return done


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id() -> str:
    t = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def takedown(root: str, list_uri: str, storage_options: dict | None = None,
             tombstone_dirs: Iterable[str] = (), block_store: str | None = None, threads: int = 8,
             run_id: str | None = None, fault: Callable[[int], None] | None = None) -> dict:
    """Remove every item the list names from everything under `root`; returns the record."""
    t0 = time.time()
    so = storage_options or None
    run_id = run_id or new_run_id()
    recovered = recover(root, so)
    entries, bad = read_list(list_uri, so)
    matcher = Matcher(entries)
    block_store = block_store or block_store_uri(root)
    record: dict[str, Any] = {
        "run_id": run_id, "started_at": _utc_now(), "root": root, "list": list_uri,
        "entries": [e.text for e in entries], "bad_lines": bad, "recovered_runs": recovered,
        "block_store": block_store}
    if not entries:
        raise TakedownError(f"{list_uri} holds no valid entry" + (f" ({len(bad)} bad lines)" if bad else ""))
    layout = scan(root, so, tombstone_dirs)
    for uri in layout.stale:   # staged by a run killed before its journal: originals are intact
        fs, path = fsio.filesystem(uri, so)
        fs.rm(path)
    stager = Stager(run_id, so)
    note = f"taken down by {TAKEDOWN_DIR}/{run_id}.json"
    changes: list[Staged] = []
    removed_uids: dict[str, str] = {}
    try:
        with ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="takedown") as pool:
            record["resolved"] = _resolve_sha256(layout, matcher, so, pool)
            tar_keys: dict[str, dict[str, str]] = {}

            # 1. download metadata (tombstones) first: it says which tar members go
            def shard_meta(uri):
                return uri, _guard(root, uri, rewrite_parquet, uri, matcher, True, stager, note, _rel(root, uri))
            for uri, (staged, facts) in pool.map(shard_meta, layout.shard_parquet):
                if staged:
                    changes.append(staged)
                removed_uids.update(facts["uids"])
                if facts["keys"]:
                    tar_keys[uri[:-len(".parquet")] + ".tar"] = {k: "listed in the download metadata"
                                                                for k in facts["keys"]}

            # 2. tars, other parquet, embedding parts and index folders, in parallel
            def tar_job(uri):
                keys = tar_keys.get(uri)
                if keys is not None and not (keys.keys() & tar_member_keys(uri, so)):
                    return None
                paired = uri[:-len(".tar")] + ".parquet" in layout.shard_parquet
                if keys is None and paired:
                    return None   # its metadata names no match: the tar holds none
                return _guard(root, uri, rewrite_tar, uri, keys or {}, matcher, stager, _rel(root, uri))

            def parquet_job(item):
                uri, tomb = item
                return _guard(root, uri, rewrite_parquet, uri, matcher, tomb, stager, note, _rel(root, uri))

            def part_job(item):
                return item, _guard(root, item[0], rewrite_embedding_part, item[0], item[1], matcher, stager, root)

            def index_job(folder):
                return _guard(root, folder, rewrite_index_folder, folder, matcher, stager, root, run_id)

            tar_f = [pool.submit(tar_job, u) for u in layout.tars]
            pq_f = [pool.submit(parquet_job, it) for it in layout.parquet]
            part_f = [pool.submit(part_job, it) for it in layout.parts]
            idx_f = [pool.submit(index_job, f) for f in layout.index_folders]
            for f in tar_f:
                if f.result():
                    changes.append(f.result())
            for f in pq_f:
                staged, facts = f.result()
                removed_uids.update(facts["uids"])
                if staged:
                    changes.append(staged)
            part_removed: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
            for f in part_f:
                (folder, number), (staged, gone, rows) = f.result()
                part_removed.setdefault(_folder_key(folder), {})[number] = (gone, rows)
                if staged:
                    changes.append(staged)
            for f in idx_f:
                staged, facts = f.result()
                if staged:
                    _check_index_alignment(facts, part_removed, staged.report["path"])
                    changes.append(staged)
    except TakedownError as exc:
        _discard_staged(root, run_id, so)
        raise TakedownError(f"{exc}; nothing was changed") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file: stop before anything is swapped
        _discard_staged(root, run_id, so)
        raise TakedownError(f"cannot read or rewrite a file under {root} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); nothing was changed") from exc

    removed_rows = sum(c.report.get("removed", 0) for c in changes)
    by_entry: dict[str, int] = {}
    for c in changes:
        for label, n in c.report.get("by_entry", {}).items():
            by_entry[label] = by_entry.get(label, 0) + n
    record.update({
        "files": sorted((c.report for c in changes), key=lambda r: r["path"]),
        "files_changed": sum(len(c.swaps) for c in changes),
        "removals": removed_rows,
        "items_removed": len(removed_uids),
        "removed_sample_ids": sorted(sample_id_of_uid(u) for u in removed_uids),
        "matches_by_entry": {e.text: by_entry.get(e.text, 0) for e in entries},
        "changed": bool(changes),
    })
    record["message"] = (f"removed {len(removed_uids)} items ({removed_rows} rows and samples) from "
                         f"{len(changes)} files" if changes else
                         "nothing to remove: no file under the root holds a listed item "
                         "(already taken down, or never there)")
    # The block store gets the entries first: whatever happens next, download never brings them back.
    block_entries = list(entries) + [Entry("sample_id", str(sid))
                                     for sids in record["resolved"].values() for sid in sids]
    known = load_block_list(block_store, so)
    fresh = [e for e in block_entries if not _in_block_list(known, e)]
    if fresh:
        fsio.write_bytes_atomic(fsio.join(block_store, f"{run_id}.txt"), _list_text(fresh), so)
    record["block_store_added"] = [e.text for e in fresh]
    _update_removal_list(root, record["removed_sample_ids"], so)
    swaps = [s for c in changes for s in c.swaps]
    record["seconds"] = round(time.time() - t0, 3)
    record["finished_at"] = _utc_now()
    if swaps:
        journal = _journal_uri(root, run_id)
        fsio.write_json(journal, {"run_id": run_id, "swaps": swaps, "record": record}, so)
        for i, (tmp, dest) in enumerate(swaps):
            if fault is not None:
                fault(i)
            swap(tmp, dest, so)
        record["seconds"] = round(time.time() - t0, 3)   # the swaps included
        record["finished_at"] = _utc_now()
        fsio.write_json(fsio.join(root, TAKEDOWN_DIR, f"{run_id}.json"), record, so)
        fs, path = fsio.filesystem(journal, so)
        fs.rm(path)
    else:
        fsio.write_json(fsio.join(root, TAKEDOWN_DIR, f"{run_id}.json"), record, so)
    record["record"] = fsio.join(root, TAKEDOWN_DIR, f"{run_id}.json")
    return record


def _folder_key(uri: str) -> str:
    uri = fsio.normalize_uri(uri).rstrip("/")
    return uri if fsio.is_remote(uri) else os.path.abspath(uri)


def _check_index_alignment(facts: dict, part_removed: dict, where: str) -> None:
    """The index ids removed must be the rows removed from its embeddings (in index-id order)."""
    subset_root = facts.get("subset_root")
    if not subset_root:
        return
    parts = part_removed.get(_folder_key(subset_root))
    if not parts:
        return
    # embedding_reader's order: npy paths sorted as strings (img_emb_10 before img_emb_2)
    order = sorted(parts, key=lambda n: f"img_emb_{n}.npy")
    offset, gone = 0, []
    for number in order:
        positions, rows = parts[number]
        gone.append(positions + offset)
        offset += rows
    if offset != facts["rows_before"]:
        return   # the index was not built from this layout as it is now
    expected = np.concatenate(gone) if gone else np.zeros(0, np.int64)
    if not np.array_equal(np.sort(expected), np.sort(facts["removed_ids"])):
        raise TakedownError(f"{where}: the rows matched in the ids parquet are not the rows matched in "
                            f"{subset_root}; the index and its embeddings disagree, nothing was changed")


def _update_removal_list(root: str, sample_ids: list[int], so: dict | None) -> None:
    """`<root>/_takedown/removal_list.txt`: every SAMPLE_ID ever taken down, the list to publish
    for holders of derived copies (ids only: it repeats no URL, caption or hash)."""
    uri = fsio.join(root, TAKEDOWN_DIR, REMOVAL_LIST)
    known: set[int] = set()
    if fsio.exists(uri, so):
        entries, _ = read_list(uri, so)
        known = {int(e.value) for e in entries if e.kind == "sample_id"}
    if not sample_ids and fsio.exists(uri, so):
        return
    text = "# SAMPLE_IDs taken down from this dataset (clipcrawl takedown); one entry per line\n"
    text += "".join(f"sample_id:{s}\n" for s in sorted(known | set(sample_ids)))
    fsio.write_bytes_atomic(uri, text.encode("utf-8"), so)
