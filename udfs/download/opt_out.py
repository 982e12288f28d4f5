"""Published opt-out lists (`download.opt_out_list`) and the content blocklist
(`download.blocked_sha256`), both plain text files read through fsio (local or s3://).

Opt-out list: one entry per line, `#` comments and blank lines ignored.
- a domain, `example.com`: the host and all its subdomains (`cdn.example.com`);
- a URL prefix, `https://example.org/gallery/`: every URL starting with it (scheme and host
  compared case-insensitively, the rest as written).
A matched URL is never requested: the check needs no network and runs before robots.txt.

Content blocklist: one lowercase or uppercase hex SHA-256 digest per line. An image whose
original bytes hash to one of them is dropped in memory, before anything is written
(status `blocked_content`). Real lists of this kind (CSAM hash lists and the like) are supplied
by partners under their own terms; none ships with the project.

Lines that are neither are counted (`invalid_lines`) and skipped, never fatal. Both lists are
loaded once per Python worker and URI.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import urlsplit

from udfs import fsio

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DOMAIN = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?)*\.?")
_CACHE: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()


def _lines(uri: str, storage_options: dict | None):
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        for raw in fh:
            line = raw.decode("utf-8", "replace").split("#", 1)[0].strip()
            if line:
                yield line


def _cached(kind: str, uri: str, storage_options: dict | None, build):
    key = (kind, uri, repr(sorted((storage_options or {}).items())))
    with _CACHE_LOCK:
        found = _CACHE.get(key)
    if found is None:
        found = build(uri, storage_options)
        with _CACHE_LOCK:
            _CACHE[key] = found
    return found


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, host, authority, path?query) of a URL: scheme and host lower-cased, the authority
    is host[:port] without a default port. None when the URL has no host."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    scheme = parts.scheme.lower()
    host = host.rstrip(".").lower()
    authority = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    rest = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, authority, rest


class OptOutList:
    """Domains and URL prefixes that opted out."""

    def __init__(self, entries=(), source: str = ""):
        self.source = source
        self.domains: set[str] = set()
        self.prefixes: dict[tuple[str, str], list[str]] = {}   # (scheme, authority) -> path prefixes
        self.invalid_lines = 0
        for entry in entries:
            self.add(entry)

    def add(self, entry: str) -> None:
        entry = entry.strip()
        if "://" in entry:
            split = _split(entry)
            if split is None or split[0] not in ("http", "https"):
                self.invalid_lines += 1
                return
            scheme, _host, authority, rest = split
            self.prefixes.setdefault((scheme, authority), []).append(rest)
            return
        domain = entry.lower().lstrip("*").lstrip(".").rstrip(".")
        if not domain or not _DOMAIN.fullmatch(domain):
            self.invalid_lines += 1
            return
        self.domains.add(domain)

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None) -> "OptOutList":
        return _cached("opt_out", uri, storage_options, lambda u, so: cls(_lines(u, so), u))

    def __len__(self) -> int:
        return len(self.domains) + sum(len(v) for v in self.prefixes.values())

    def match(self, url: str) -> str | None:
        """The entry that covers `url` (`domain example.com` / `prefix https://...`), else None."""
        split = _split(url)
        if split is None:
            return None
        scheme, host, authority, rest = split
        if self.domains:
            labels = host.split(".")
            for i in range(len(labels)):
                candidate = ".".join(labels[i:])
                if candidate in self.domains:
                    return f"domain {candidate}"
        for prefix in self.prefixes.get((scheme, authority), ()):
            if rest.startswith(prefix):
                return f"prefix {scheme}://{authority}{prefix}"
        return None


_HEX16 = re.compile(r"[0-9a-f]{16}")


class Sha256Blocklist:
    """A set of SHA-256 hex digests of content that must never be stored."""

    def __init__(self, lines=(), source: str = ""):
        self.source = source
        self.digests: set[str] = set()
        self.invalid_lines = 0
        for line in lines:
            digest = line.strip().lower()
            if _HEX64.fullmatch(digest):
                self.digests.add(digest)
            else:
                self.invalid_lines += 1

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None) -> "Sha256Blocklist":
        return _cached("sha256", uri, storage_options, lambda u, so: cls(_lines(u, so), u))

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, digest: str) -> bool:
        return digest in self.digests


class PhashBlocklist:
    """64-bit perceptual hashes (hex, one per line) of content that must never be stored: a decoded
    image within `max_distance` bits of one is dropped like a listed SHA-256, so a re-encoded or
    resized copy of listed content is caught too (the pHash of udfs.download.image_hash)."""

    def __init__(self, lines=(), source: str = "", max_distance: int = 4):
        import numpy as np

        from udfs.download import image_hash

        self.source = source
        self.max_distance = int(max_distance)
        self.invalid_lines = 0
        values = []
        for line in lines:
            text = line.strip().lower().removeprefix("0x")
            if _HEX16.fullmatch(text):
                values.append(image_hash.to_signed(int(text, 16)))
            else:
                self.invalid_lines += 1
        self.hashes = image_hash.as_uint64(np.array(values, dtype=np.int64))

    @classmethod
    def load(cls, uri: str, max_distance: int, storage_options: dict | None = None) -> "PhashBlocklist":
        return _cached(f"phash-{int(max_distance)}", uri, storage_options,
                       lambda u, so: cls(_lines(u, so), u, max_distance))

    def __len__(self) -> int:
        return len(self.hashes)

    def match(self, phash: int | None) -> tuple[str, int] | None:
        """(the listed hash in hex, its distance) of the nearest listed hash within max_distance."""
        if phash is None or not len(self.hashes):
            return None
        from udfs.download import image_hash

        d = image_hash.hamming_matrix([phash], self.hashes)[0]
        best = int(d.argmin())
        if d[best] > self.max_distance:
            return None
        return f"{int(self.hashes[best]):016x}", int(d[best])
