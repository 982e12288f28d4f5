"""Webdataset tar shards, written through `udfs.fsio` (local paths and s3:// alike), and a reader.

A shard is streamed: samples are appended as they finish, so a 10,000-image shard never sits in
memory. Local shards are written to a hidden temporary sibling and renamed when complete; on an
object store the upload (s3fs multipart) becomes visible only on close. After closing, the size the
store reports is compared with the bytes written and a mismatch raises: an S3 write never fails
silently (img2dataset's most reported storage problem).

The reader groups consecutive tar members by key (`KEY.jpg`, `KEY.txt`, `KEY.json` -> one sample),
the way `webdataset` does; tests and the retry path use it.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import time
import uuid
from typing import Iterator

from udfs import fsio
from udfs.download import tar_format


class ShardWriteError(IOError):
    """A shard (or its metadata) did not land intact on the target filesystem."""


def verify_size(uri: str, expected: int, storage_options: dict | None = None) -> None:
    fs, path = fsio.filesystem(uri, storage_options)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches listings
        pass
    try:
        actual = fs.info(path).get("size")
    except FileNotFoundError as exc:
        raise ShardWriteError(f"{uri} is missing after writing it") from exc
    if actual != expected:
        raise ShardWriteError(f"{uri} has {actual} bytes after writing {expected}")


def write_verified(uri: str, data: bytes, storage_options: dict | None = None) -> int:
    """Atomic write (fsio) followed by a size check against the store."""
    fsio.write_bytes_atomic(uri, data, storage_options)
    verify_size(uri, len(data), storage_options)
    return len(data)


class TarShardWriter:
    """Stream samples into `<uri>`; use as a context manager (an exception discards the shard)."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri, self.storage_options = uri, storage_options
        self.remote = fsio.is_remote(uri)
        fs, path = fsio.filesystem(uri, storage_options)
        self.fs, self.path = fs, path
        if self.remote:
            self._target = path
        else:
            folder = os.path.dirname(path) or "."
            os.makedirs(folder, exist_ok=True)
            self._target = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        self._fh = fs.open(self._target, "wb")
        self._offset = 0   # bytes written so far (the headers are tar_format's, as tarfile writes them)
        self.samples = 0
        self.bytes_written = 0
        self.write_seconds = 0.0
        self._mtime = int(time.time())

    def write(self, key: str, files: dict[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample: `files` maps an extension (`jpg`, `txt`, `json`) to its bytes. Returns
        {ext: (offset of its data in the tar, size)}: download records the image's, so export
        copies it by range without reading the tar's headers."""
        t0 = time.perf_counter()
        parts, placed, at = [], {}, self._offset
        for ext, data in files.items():
            header, _, pad = piece = tar_format.member_parts(f"{key}.{ext}", data, self._mtime)
            placed[ext] = (at + len(header), len(data))
            parts += piece
            at += len(header) + len(data) + len(pad)
        self._fh.write(b"".join(parts))
        self._offset = at
        self.samples += 1
        self.write_seconds += time.perf_counter() - t0
        return placed

    def close(self) -> int:
        t0 = time.perf_counter()
        end = tar_format.end_of_archive(self._offset)
        self._fh.write(end)
        self._fh.close()       # s3fs: completes the multipart upload, raises on failure
        size = self._offset + len(end)
        if not self.remote:
            os.replace(self._target, self.path)
        verify_size(self.uri, size, self.storage_options)
        self.bytes_written = size
        self.write_seconds += time.perf_counter() - t0
        return size

    def abort(self) -> None:
        try:
            self._fh.close()
        except Exception:  # noqa: BLE001 - already failing; keep the original error
            pass
        try:
            if self.fs.exists(self._target):
                self.fs.rm(self._target)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        self.close()
        return False


def split_key(name: str) -> tuple[str, str]:
    """`dir/000010003.jpg` -> (`dir/000010003`, `jpg`), as webdataset splits at the first dot of
    the basename."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext


def iter_samples(uri: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Read a webdataset tar: yields {"__key__": key, ext: bytes, ...} per sample."""
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        with tarfile.open(fileobj=fh, mode="r|") as tar:
            current: dict | None = None
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                data = tar.extractfile(member).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext] = data
            if current is not None:
                yield current


def sample_json(sample: dict) -> dict:
    return json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
