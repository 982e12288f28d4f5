"""File IO through fsspec, shared by the driver and the workers (no Spark here).

Everything that is not Spark's own parquet IO (WAT files, paths lists, tar shards, Bloom filters,
embeddings, indices, stats JSON) goes through these functions, so local paths, s3:// (s3fs) and
https:// behave the same and tests can point them at a moto server.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any, Iterable

import fsspec

# Hadoop-style schemes that fsspec spells differently.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3"}


def normalize_uri(uri: str) -> str:
    """Map Spark/Hadoop spellings to fsspec ones: s3a:// -> s3://, dbfs:/x -> /dbfs/x, file:/x -> /x."""
    uri = os.fspath(uri)
    scheme, sep, rest = uri.partition("://")
    if sep and scheme in _SCHEME_ALIASES:
        return f"{_SCHEME_ALIASES[scheme]}://{rest}"
    if uri.startswith("dbfs:/"):
        return "/dbfs/" + uri[len("dbfs:/"):].lstrip("/")
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("file:/"):
        return uri[len("file:"):]
    return uri


def filesystem(uri: str, storage_options: dict | None = None):
    """(fs, path) for a URI; storage_options are passed to the fsspec backend (e.g. endpoint_url)."""
    fs, path = fsspec.core.url_to_fs(normalize_uri(uri), **(storage_options or {}))
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in normalize_uri(uri)


def join(base: str, *parts: str) -> str:
    base = os.fspath(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def open_uri(uri: str, mode: str = "rb", storage_options: dict | None = None, **kwargs):
    fs, path = filesystem(uri, storage_options)
    if "w" in mode and not is_remote(uri):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode, **kwargs)


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def expand(patterns: Iterable[str], storage_options: dict | None = None) -> list[str]:
    """Expand globs; plain paths are kept even when missing so the caller can count them as failed."""
    out: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            fs, path = filesystem(pattern, storage_options)
            matches = sorted(fs.glob(path))
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if protocol in ("file", "local") else f"{protocol}://"
            out.extend(prefix + m.lstrip("/") if prefix else m for m in matches)
        else:
            out.append(pattern)
    return out


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict | None = None,
                       durable: bool = True) -> None:
    """Write so that readers see the old content or the new one, never a partial file.

    Local: write a temporary sibling, then rename. Object stores (s3, gs): a single PUT is already
    atomic per object. `durable=False` skips the fsync, for files a rerun rewrites anyway (export's
    manifest parts and located rows), where an fsync per file costs more than writing them.
    """
    fs, path = filesystem(uri, storage_options)
    if is_remote(uri):
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove(uri: str, storage_options: dict | None = None) -> None:
    """Remove a file or a whole folder, if it is there."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json(uri: str, obj: Any, storage_options: dict | None = None) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")
    write_bytes_atomic(uri, data + b"\n", storage_options)


def read_json(uri: str, storage_options: dict | None = None) -> Any:
    with open_uri(uri, "rb", storage_options) as fh:
        return json.loads(fh.read().decode("utf-8"))
