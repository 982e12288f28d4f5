"""Read one image out of a webdataset tar shard by key, without unpacking the shard.

The first read of a shard scans its headers once (tarfile) and keeps the member table (name ->
data offset, size); later reads seek straight to the bytes with a ranged read, which matters when
the shard is on s3. Tables of recently used shards are kept in a small LRU.
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict

from udfs import fsio

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class ThumbnailReader:
    def __init__(self, max_shards: int = 64, storage_options: dict | None = None):
        self.max_shards = max(1, max_shards)
        self.storage_options = storage_options
        self._tables: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def _table(self, tar_path: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            if tar_path in self._tables:
                self._tables.move_to_end(tar_path)
                return self._tables[tar_path]
        table = {}
        with fsio.open_uri(tar_path, "rb", self.storage_options) as fh:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        table[member.name] = (member.offset_data, member.size)
        with self._lock:
            self._tables[tar_path] = table
            while len(self._tables) > self.max_shards:
                self._tables.popitem(last=False)
        return table

    def read(self, tar_path: str, key: str) -> tuple[bytes, str] | None:
        """(image bytes, content type) of `key` in the shard, or None when the shard or the
        member is missing."""
        for ext, content_type in IMAGE_TYPES.items():
            data = self.read_member(tar_path, f"{key}.{ext}")
            if data is not None:
                return data, content_type
        return None

    def read_json(self, tar_path: str, key: str) -> dict | None:
        """The sample's `KEY.json` (the download metadata: page_url, sizes...), None if absent."""
        import json

        data = self.read_member(tar_path, f"{key}.json")
        try:
            obj = json.loads(data) if data else None
        except (ValueError, UnicodeDecodeError):
            return None
        return obj if isinstance(obj, dict) else None

    def read_member(self, tar_path: str, name: str) -> bytes | None:
        """One member's bytes by a ranged read, or None when the shard or the member is missing."""
        try:
            entry = self._table(tar_path).get(name)
            if entry is None:
                return None
            offset, size = entry
            with fsio.open_uri(tar_path, "rb", self.storage_options) as fh:
                fh.seek(offset)
                return fh.read(size)
        except (FileNotFoundError, tarfile.TarError, OSError):
            return None
