"""The takedown block list as the download stage reads it: removal-list entries, the matcher, the store.

A removal list holds one entry per line: a URL, `sample_id:<int>`, `sha256:<hex>` or
`domain:<host>`; `#` starts a comment. The `takedown` command (udfs/takedown/rewrite.py) parses
lists with these rules and adds every list it applies to the block store under the root, which
download consults so that a taken-down item is never fetched or written again.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from udfs import fsio
from udfs.dedup.dedup_keys import url_key

TAKEDOWN_DIR = "_takedown"
BLOCKED_DIR = "blocked"
KINDS = ("url", "sample_id", "sha256", "domain")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


# --- the list ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    kind: str     # url | sample_id | sha256 | domain
    value: str    # normalised: url key, decimal int64, lower-case hex, lower-case host

    @property
    def text(self) -> str:
        return self.value if self.kind == "url" else f"{self.kind}:{self.value}"


def parse_entry(line: str) -> Entry | None:
    """One line -> Entry, None for blank lines and comments; ValueError says what is wrong."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    low = line.lower()
    if low.startswith(("http://", "https://")):
        return Entry("url", url_key(line))
    kind, sep, value = line.split("#", 1)[0].partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or kind not in KINDS[1:]:
        raise ValueError("expected a http(s) URL, sample_id:<int>, sha256:<hex> or domain:<host>")
    if kind == "sample_id":
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"sample_id {value!r} is not an integer") from None
        if not -2 ** 63 <= number < 2 ** 63:
            raise ValueError(f"sample_id {number} is outside the signed 64-bit range")
        return Entry("sample_id", str(number))
    if kind == "sha256":
        if not _HEX64.match(value.lower()):
            raise ValueError("sha256 must be 64 hexadecimal digits")
        return Entry("sha256", value.lower())
    host = value.lower().strip(".")
    if not _HOST.match(host):
        raise ValueError(f"domain {value!r} is not a host name")
    return Entry("domain", host)


def parse_list(text: str) -> tuple[list[Entry], list[dict]]:
    """(entries in first-seen order without repeats, bad lines as {line, text, error})."""
    entries: dict[Entry, None] = {}
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = parse_entry(line)
        except ValueError as exc:
            bad.append({"line": number, "text": line.strip()[:300], "error": str(exc)})
            continue
        if entry is not None:
            entries.setdefault(entry, None)
    return list(entries), bad


def read_list(uri: str, storage_options: dict | None = None) -> tuple[list[Entry], list[dict]]:
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        return parse_list(fh.read().decode("utf-8", errors="replace"))


def uid_of_sample_id(sample_id: int) -> str:
    """SAMPLE_ID (signed int64) -> the 16-hex uid it was made from (udfs.ids.uid_to_int64)."""
    return (int(sample_id) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big").hex()


def sample_id_of_uid(uid: str) -> int:
    return int.from_bytes(bytes.fromhex(uid), "big", signed=True)


def host_of(url: str | None) -> str | None:
    try:
        host = urlsplit(url or "").hostname
    except ValueError:
        return None
    return host.lower().rstrip(".") if host else None


class Matcher:
    """Which entry (if any) a row matches, from whichever of url / uid / sha256 the row has."""

    def __init__(self, entries: Iterable[Entry] = ()):
        self.urls: dict[str, str] = {}
        self.uids: dict[str, str] = {}
        self.sha256: dict[str, str] = {}
        self.domains: dict[str, str] = {}
        for e in entries:
            self.add(e)

    def add(self, entry: Entry, label: str | None = None) -> None:
        label = label or entry.text
        if entry.kind == "url":
            self.urls.setdefault(entry.value, label)
        elif entry.kind == "sample_id":
            self.uids.setdefault(uid_of_sample_id(int(entry.value)), label)
        elif entry.kind == "sha256":
            self.sha256.setdefault(entry.value, label)
        else:
            self.domains.setdefault(entry.value, label)

    def __bool__(self) -> bool:
        return bool(self.urls or self.uids or self.sha256 or self.domains)

    def _domain(self, url: str | None) -> str | None:
        host = host_of(url)
        while host:
            if host in self.domains:
                return self.domains[host]
            _, dot, host = host.partition(".")
            if not dot:
                return None
        return None

    def match(self, url: str | None = None, uid: str | None = None, sha256: str | None = None) -> str | None:
        """The label of the first matching entry, or None."""
        if uid and uid in self.uids:
            return self.uids[uid]
        if sha256 and sha256 in self.sha256:
            return self.sha256[sha256]
        if url:
            hit = self.urls.get(url_key(url))
            if hit is not None:
                return hit
            if self.domains:
                return self._domain(url)
        return None

    def match_table(self, table) -> list[str | None]:
        """Per row of an Arrow table: the matching entry's label or None."""
        cols = set(table.column_names)
        n = table.num_rows
        urls = table.column("url" if "url" in cols else "URL").to_pylist() if cols & {"url", "URL"} else [None] * n
        if "uid" in cols:
            uids = table.column("uid").to_pylist()
        elif cols & {"SAMPLE_ID", "hash"}:
            ids = table.column("SAMPLE_ID" if "SAMPLE_ID" in cols else "hash").to_pylist()
            uids = [uid_of_sample_id(v) if v is not None else None for v in ids]
        else:
            uids = [None] * n
        shas = table.column("sha256").to_pylist() if "sha256" in cols else [None] * n
        return [self.match(u, i, s) for u, i, s in zip(urls, uids, shas)]


# --- block store: what download must never fetch or write again --------------------------------

def block_store_uri(root: str) -> str:
    return fsio.join(root, TAKEDOWN_DIR, BLOCKED_DIR)


def block_store_beside(output: str) -> str:
    """The block store of the root a stage's output folder is in (`<root>/images` -> `<root>`)."""
    parent = posixpath.dirname(fsio.normalize_uri(output).rstrip("/")) or "."
    return block_store_uri(parent)


def load_block_list(store: str | None, storage_options: dict | None = None) -> Matcher:
    """Every entry ever added to the store (one list file per takedown run); empty when absent."""
    matcher = Matcher()
    if not store or not fsio.exists(store, storage_options):
        return matcher
    for uri in fsio.expand([fsio.join(store, "*.txt")], storage_options):
        entries, _ = read_list(uri, storage_options)
        for e in entries:
            matcher.add(e, f"{e.text} (takedown {posixpath.basename(uri)[:-4]})")
    return matcher
