"""Streaming extraction of image/alt-text pairs from Common Crawl WAT (and WARC/ARC) files. Pure Python.

One call, `extract_file`, turns one file (any fsspec URI) into a stream of rows: kept pairs,
rejected links or records with their reason, and last one `FileOutcome`. It holds one record at a
time, never the file, and never raises for bad input: a broken file ends with status `partial`
(pairs read before the problem are kept) or `failed`, with the reason in `error_message`.

Layers, from the bytes up:
- record readers, `wat_extract.reader`: `fastwarc` (default; Rust WARC + gzip parsing, ~2.5x
  faster than warcio here, see bench/bench_wat.py), `tolerant` (udfs.extract.warc_records alone) or
  `warcio` (a second opinion over our `GzipMembers`, which reports truncation). FastWARC reads
  while the file is well formed; at the first record it cannot read (bare-LF headers, ARC, zstd,
  a lying Content-Length, a corrupt member) udfs.extract.warc_records takes over at that record, and it
  always reads the last record, which notices a truncated last member or unread members. So the
  tolerant paths cost nothing on well-formed input. Every record is counted by type, or lost
  with a reason (also a rejected row); compression is told by content.
- WARC input: `udfs.extract.warc_html.response_body` (the HTTP layer, udfs.extract.http_message: encodings that
  do not match the stored body, bare LF, no status line) and udfs.extract.charsets for the page's text.
- `wat_links` / `udfs.extract.warc_html.html_links`: the image links of one record, with the page URL
  and `<base href>`.
- `LinkRules` + `udfs.extract.urls.Resolver`: URL resolution/normalisation and alt-text rules; the
  common case (absolute-able URL, plain alt of acceptable length) is inlined in the hot loop.

JSON is decoded by msgspec into typed structs holding only the fields read (`_wat_links_typed`;
~1.25x orjson, which builds a dict per anchor link), and every payload of another shape goes to
orjson (about 2x the standard library), with `json` as the fallback; payloads that are not UTF-8
are decoded with U+FFFD replacement, parsed and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, NamedTuple

from udfs import ids
from udfs.extract import alt_text, page_opt_out, urls, warc_records
from udfs.extract.links import RecordLinks

try:  # orjson is a hard requirement in requirements.txt; the fallback keeps udfs importable anywhere
    import orjson

    _loads = orjson.loads
    _JSONError: tuple = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised only without orjson
    _loads = json.loads
    _JSONError = (ValueError,)

try:  # msgspec: the typed fast path of wat_links (without it, the orjson path does it all)
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None

READERS = ("warcio", "fastwarc", "tolerant")
FORMATS = ("wat", "warc")
IMG_PATH = "IMG@/src"
BASE_PATH = "__base__"
_WANTED_PATHS = frozenset((IMG_PATH, BASE_PATH))
_CRAWL_RE = re.compile(r"CC-MAIN-\d{4}-\d{2}")
_GZIP_MAGIC = b"\x1f\x8b"
_HTTP_PREFIXES = ("http://", "https://")
_blake2b = hashlib.blake2b


_new_tuple = tuple.__new__


def crawl_of(path: str) -> str:
    """`CC-MAIN-YYYY-WW` from a Common Crawl path, else "unknown" (the partition value)."""
    m = _CRAWL_RE.search(path)
    return m.group(0) if m else "unknown"


# --- rows -------------------------------------------------------------------------------------------

class Pair(NamedTuple):
    uid: str
    url: str
    text: str
    page_url: str | None
    source_file: str
    record_id: str | None
    record_date: str | None
    alt_truncated: bool
    page_opt_out: str | None    # the page's opt-out meta tag (udfs.extract.page_opt_out), else None
    crawl: str


class Rejected(NamedTuple):
    url: str | None
    text: str | None
    page_url: str | None
    source_file: str
    record_id: str | None
    status: str
    error_message: str
    level: str          # "link": one image link; "record": a whole record (invalid JSON, ...)
    crawl: str


@dataclass
class FileOutcome:
    """What happened to one input file (one row of the file-outcome table)."""
    source_file: str
    status: str = "ok"                 # ok | partial | failed
    error_message: str | None = None
    records_read: int = 0              # WARC records of any type
    metadata_records: int = 0          # records of the wanted type: metadata (WAT) / response (WARC)
    html_records: int = 0              # of those, records describing an HTML page
    links_seen: int = 0                # image links seen (= pairs_kept + link-level rejects)
    pairs_kept: int = 0
    pairs_rejected: int = 0            # link-level rejects
    records_rejected: int = 0          # record-level rejects (invalid_json, missing_fields)
    records_non_utf8: int = 0          # payloads decoded with U+FFFD replacement
    alt_truncated: int = 0
    seconds: float = 0.0
    compressed_bytes: int = 0
    # Every record is accounted for: records_read = sum(records_by_type); of the wanted type,
    # metadata_records = html_records + records_not_html + (records_rejected without links);
    # what could not be read is in records_lost by reason (bytes_skipped to resynchronise).
    records_by_type: dict = field(default_factory=dict)
    records_not_html: int = 0          # wanted records with nothing to take (request, dns:, image)
    records_lost: int = 0
    lost_reasons: dict = field(default_factory=dict)   # reason -> records (or fragments) lost
    bytes_skipped: int = 0
    records_bad_date: int = 0          # unparsable WARC-Date: kept, record_date null
    records_charset_detected: int = 0  # HTML decoded with a detected (undeclared) charset
    quirks: dict = field(default_factory=dict)         # quirk -> records (see udfs.extract.warc_records)
    # records read although damaged (a Content-Length that lies, read by resync; a body that does
    # not decode): each is also one rejected row (level record, status bad_record)
    records_damaged: int = 0
    damage_reasons: dict = field(default_factory=dict)  # reason -> records
    reader_used: str | None = None     # fastwarc | warcio | tolerant | fastwarc+tolerant
    archive_format: str | None = None  # warc | arc
    compression: str | None = None     # gzip | zstd | none

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# --- gzip layer -------------------------------------------------------------------------------------

class InputProblem(Exception):
    """A file-level problem: `reason` becomes part of the file outcome's error_message."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class GzipMembers(io.RawIOBase):
    """Read-only stream of the decompressed content of a multi-member gzip (or plain) file.

    Decompresses `chunk_size` compressed bytes at a time and never emits more than `max_out`
    bytes per call, so memory stays bounded even for a gzip bomb. After EOF, `truncated` tells
    whether the last member was cut short; a corrupt member raises InputProblem('bad_gzip').
    """

    def __init__(self, raw, chunk_size: int = 1 << 20, max_out: int = 4 << 20):
        super().__init__()
        self._raw = raw
        self._chunk = chunk_size
        self._max_out = max_out
        self.compressed_bytes = 0
        self.truncated = False
        self.members = 0
        self._pending = b""      # decompressed bytes not yet returned
        self._out_pos = 0        # decompressed bytes produced so far (for tell)
        self._pos = 0
        self._tail = b""         # compressed bytes not yet fed
        self._eof_in = False
        self._done = False
        head = self._read_raw()
        if not head:
            self._done = True
            self.gzip = False
            self.empty = True
            return
        self.empty = False
        self.gzip = head[:2] == _GZIP_MAGIC
        if self.gzip:
            self._d = zlib.decompressobj(31)
            self._in_member = True
            self.members = 1
            self._tail = head
        else:
            if not head.lstrip(b"\r\n").startswith((b"WARC/", b"filedesc://")):
                raise InputProblem("not_warc", f"not a gzip or WARC file (starts with {head[:16]!r})")
            self._pending = head
            self._out_pos = len(head)

    def _read_raw(self) -> bytes:
        data = self._raw.read(self._chunk)
        if not data:
            self._eof_in = True
            return b""
        self.compressed_bytes += len(data)
        return data

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        """Append more decompressed bytes to `_pending` (or set `_done`)."""
        if not self.gzip:
            data = self._read_raw()
            if data:
                self._pending = data
                self._out_pos += len(data)
            else:
                self._done = True
            return
        while True:
            if not self._tail:
                self._tail = self._read_raw()
                if not self._tail:
                    if self._in_member:
                        self.truncated = True
                    self._done = True
                    return
            if not self._in_member:
                # Between members: a new member must start here (trailing NULs are tolerated).
                if not self._tail.strip(b"\x00"):
                    self._tail = b""
                    continue
                if len(self._tail) < 2 and not self._eof_in:
                    self._tail += self._read_raw()
                if self._tail[:2] != _GZIP_MAGIC:
                    raise InputProblem("bad_gzip", f"garbage between gzip members "
                                                   f"(after member {self.members})")
                self._d = zlib.decompressobj(31)
                self._in_member = True
                self.members += 1
            try:
                out = self._d.decompress(self._tail, self._max_out)
            except zlib.error as exc:
                raise InputProblem("bad_gzip", f"corrupt gzip member {self.members}: {exc}") from exc
            if self._d.eof:
                self._tail = self._d.unused_data
                self._in_member = False
            else:
                self._tail = self._d.unconsumed_tail
            if out:
                self._pending = out
                self._out_pos += len(out)
                return

    def read(self, size: int = -1) -> bytes:
        if self._pos >= len(self._pending):
            if self._done:
                return b""
            self._pending, self._pos = b"", 0
            self._fill()
            if not self._pending:
                return b""
        if size is None or size < 0:
            size = len(self._pending) - self._pos
        end = self._pos + size
        chunk = self._pending[self._pos:end]
        self._pos = end if end < len(self._pending) else len(self._pending)
        return chunk

    def tell(self) -> int:
        return self._out_pos - (len(self._pending) - self._pos)

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Only forward seeks (FastWARC seeks to skip record bodies): read and discard."""
        target = offset if whence == io.SEEK_SET else self.tell() + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self.tell():
            raise io.UnsupportedOperation("GzipMembers only seeks forward")
        while self.tell() < target:
            if not self.read(min(target - self.tell(), 1 << 20)):
                break
        return self.tell()

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


# --- record readers ---------------------------------------------------------------------------------

class Record(NamedTuple):
    rec_type: str
    headers: Any                    # WARC headers with .get(name); read only for records with links
    payload: bytes | None           # the record block (WAT JSON, HTTP message); None when not wanted


class _WarcioHeaders:
    __slots__ = ("get",)

    def __init__(self, status_and_headers):
        self.get = status_and_headers.get_header


class _ReadState:
    """What a record reader learned about the file besides its records."""

    def __init__(self):
        self.compressed_bytes = 0
        self.log = warc_records.ReadLog()   # losses, quirks (tolerant reader)
        self.reader = None
        self.fallback: str | None = None    # why the fast reader handed over


def _check_head(raw) -> bool:
    """Peek at the first bytes: True for gzip, False for plain WARC; InputProblem otherwise."""
    head = raw.read(64)
    raw.seek(0)
    if not head:
        raise InputProblem("empty_file", "file is empty (0 bytes)")
    if head[:2] == _GZIP_MAGIC:
        return True
    if not head.lstrip(b"\r\n").startswith((b"WARC/", b"filedesc://")):
        raise InputProblem("not_warc", f"not a gzip or WARC file (starts with {head[:16]!r})")
    return False


def _warcio_records(raw, want: str, state: _ReadState, chunk_size: int) -> Iterator[Record]:
    """warcio over our own decompression (GzipMembers), which reports truncation."""
    from warcio.archiveiterator import ArchiveIterator

    state.reader = "warcio"
    _check_head(raw)
    stream = GzipMembers(raw, chunk_size=chunk_size)
    for rec in ArchiveIterator(stream, no_record_parse=True, arc2warc=True):
        rtype = rec.rec_type
        if rtype != want:
            yield Record(rtype, None, None)
            continue
        yield Record(rtype, _WarcioHeaders(rec.rec_headers), rec.raw_stream.read())
    state.compressed_bytes = stream.compressed_bytes
    state.log.compression = "gzip" if stream.gzip else "none"
    if stream.truncated:
        raise InputProblem("truncated_gzip", f"file ends inside gzip member {stream.members}")


def _fastwarc_records(raw, want: str, state: _ReadState, chunk_size: int) -> Iterator[Record]:
    """FastWARC (Rust WARC + gzip parsing) while the file is well formed; from the first record it
    cannot read (a bare-LF header, ARC, zstd, a lying Content-Length that breaks the next header)
    the tolerant reader takes over at that record.

    A record is given only once FastWARC has read the next record's header, which proves its
    Content-Length; the last record of the file is read by the tolerant reader, which also
    notices a truncated last gzip member and members FastWARC did not read (one record of
    Python parsing per file)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    want_type = WarcRecordType.metadata if want == "metadata" else WarcRecordType.response
    unknown = WarcRecordType.unknown
    state.reader = "fastwarc"
    head = raw.read(64)
    raw.seek(0)
    if not head:
        raise InputProblem("empty_file", "file is empty (0 bytes)")
    is_gzip = head[:2] == _GZIP_MAGIC
    given = 0
    pending = None          # the last record read, not given yet
    pending_pos = 0
    reason = None
    if not is_gzip and not head.lstrip(b"\r\n").startswith((b"WARC/1.0\r\n", b"WARC/1.1\r\n")):
        reason = "not a gzip or WARC/1.x file"
    else:
        try:
            for rec in ArchiveIterator(raw, parse_http=False, stream_detect=True, fsspec_args=False):
                if pending is not None:
                    given += 1
                    yield pending
                pos = rec.stream_pos
                if rec.record_type != want_type:
                    if rec.record_type == unknown:
                        # a header FastWARC could not parse (bare LF, ...): it reads it as a
                        # record without headers, so the tolerant reader takes this one over
                        reason = f"FastWARC cannot parse the record header at byte {pos}"
                        pending = None
                        pending_pos = pos
                        break
                    pending = Record(str(rec.record_type), None, None)
                else:
                    pending = _new_tuple(Record, (want, rec.headers, rec.reader.read()))
                pending_pos = pos
        except BaseException as exc:  # noqa: BLE001 - Rust panics arrive as PanicException
            if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)) or is_transient(exc):
                raise
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    # Resume at the first record not given if it starts a gzip member (Common Crawl's layout) or
    # a plain WARC record; else from the start, skipping the records given.
    start, skip = 0, given
    if given or pending_pos:
        raw.seek(pending_pos)
        peek = raw.read(8)
        if (is_gzip and peek[:2] == _GZIP_MAGIC) or (not is_gzip and peek.startswith(b"WARC/")):
            start, skip = pending_pos, 0
    raw.seek(start)
    log = state.log
    n_tail = 0
    for rec in warc_records.read_records(raw, frozenset((want,)), log, chunk_size, skip=skip,
                                         offset=start):
        n_tail += 1
        yield _new_tuple(Record, (rec.rec_type, rec.headers, rec.block))
    if reason or n_tail > (1 if pending is not None else 0):
        state.fallback = reason or f"records FastWARC did not read after byte {pending_pos}"
        state.reader = "fastwarc+tolerant" if given else "tolerant"
    state.compressed_bytes = raw.seek(0, io.SEEK_END)


def _tolerant_records(raw, want: str, state: _ReadState, chunk_size: int) -> Iterator[Record]:
    """Only the tolerant reader (udfs.extract.warc_records)."""
    state.reader = "tolerant"
    if not raw.read(1):
        raise InputProblem("empty_file", "file is empty (0 bytes)")
    raw.seek(0)
    for rec in warc_records.read_records(raw, frozenset((want,)), state.log, chunk_size):
        yield Record(rec.rec_type, rec.headers, rec.block)
    state.compressed_bytes = state.log.compressed_bytes


_READER_FUNCS = {"warcio": _warcio_records, "fastwarc": _fastwarc_records,
                 "tolerant": _tolerant_records}


# --- link rules -------------------------------------------------------------------------------------

@dataclass
class LinkRules:
    """The keep/reject rules for one link, from the `wat_extract` config section."""
    min_alt_length: int = 5
    max_alt_length: int = 4096
    schemes: tuple[str, ...] = ("http", "https")
    unescape_alt: bool = True

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "LinkRules":
        return cls(min_alt_length=int(section.get("min_alt_length", 5)),
                   max_alt_length=int(section.get("max_alt_length", 4096)),
                   schemes=tuple(section.get("schemes") or ("http", "https")))

    def judge(self, resolver: urls.Resolver, raw_url: str | None, raw_alt: str | None,
              unescape: bool) -> tuple[str | None, str | None, bool, str | None, str]:
        """-> (url, text, truncated, status, error_message); status None means keep.
        URL problems are reported before alt-text problems."""
        try:
            url = resolver.absolute(raw_url)
        except urls.UrlError as exc:
            alt = alt_text.clean_alt(raw_alt, self.min_alt_length, self.max_alt_length, unescape)
            return _cap(raw_url), alt.text, alt.truncated, exc.reason, str(exc)
        # Fast path of alt_text.clean_alt for the common case (same result; saves a call per link)
        if raw_alt is not None and "&" not in raw_alt and "\x00" not in raw_alt:
            text = " ".join(raw_alt.split())
            if self.min_alt_length <= len(text) <= self.max_alt_length:
                return url, text, False, None, ""
        alt = alt_text.clean_alt(raw_alt, self.min_alt_length, self.max_alt_length, unescape)
        if alt.status is not None:
            return url, alt.text, False, alt.status, _ALT_MESSAGES[alt.status].format(self.min_alt_length)
        return url, alt.text, alt.truncated, None, ""


_ALT_MESSAGES = {"missing_alt": "image has no alt attribute",
                 "empty_alt": "alt-text is empty or whitespace",
                 "alt_too_short": "alt-text shorter than {} characters"}


def _cap(value: str | None, limit: int = 2048) -> str | None:
    if value is None or not isinstance(value, str):
        return None if value is None else str(value)[:limit]
    return value[:limit]


# --- WAT records ------------------------------------------------------------------------------------

def parse_json_payload(payload: bytes) -> tuple[Any, bool]:
    """-> (object, non_utf8). Raises ValueError when the payload is not JSON."""
    try:
        return _loads(payload), False
    except _JSONError:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return json.loads(payload.decode("utf-8", "replace")), True
        raise


# The typed fast path of wat_links (msgspec): the JSON is checked in full, as with orjson, but
# only the fields read below become Python objects (for a page's ~100 anchor links: the path,
# url and alt strings, no dict, no "text"). Any payload that does not fit these types exactly
# (a value of another type, a link that is not an object, a non-UTF-8 or unparsable payload)
# falls back to the orjson path, which gives the rows and messages for such records.
# One known difference: a number beyond float range (`1e400`) in a field not read makes orjson
# reject the payload (invalid_json) while the typed path reads the record (json.loads, too).
if msgspec is not None:
    class _Link(msgspec.Struct, gc=False):
        path: "str | None" = None
        url: Any = None
        alt: Any = None

    class _Head(msgspec.Struct):
        Metas: Any = None

    class _Html(msgspec.Struct):
        Links: "list[_Link]" = []
        Head: "_Head | None" = None

    class _Response(msgspec.Struct, rename={"html": "HTML-Metadata"}):
        html: "_Html | None" = None

    class _PayloadMeta(msgspec.Struct, rename={"response": "HTTP-Response-Metadata"}):
        response: "_Response | None" = None

    class _WarcHeader(msgspec.Struct, rename={"target": "WARC-Target-URI"}):
        target: Any = None

    class _Envelope(msgspec.Struct, rename={"header": "WARC-Header-Metadata",
                                            "meta": "Payload-Metadata"}):
        header: "_WarcHeader | None" = None
        meta: "_PayloadMeta | None" = None

    class _Doc(msgspec.Struct):
        Envelope: "_Envelope | None" = None

    _typed_decode = msgspec.json.Decoder(_Doc).decode
    _TypedErrors: tuple = (msgspec.DecodeError, msgspec.ValidationError, RecursionError,
                           UnicodeDecodeError)
else:  # pragma: no cover - exercised only without msgspec
    _typed_decode = None


def _wat_links_typed(payload: bytes, target_uri: str | None) -> RecordLinks | None:
    """wat_links for a payload of the usual shape, else None (then the orjson path decides)."""
    try:
        if not payload.isascii():
            payload.decode("utf-8")   # the typed decoder does not check strings it skips
        doc = _typed_decode(payload)
    except _TypedErrors:
        return None
    envelope = doc.Envelope
    if envelope is None:
        return None
    header = envelope.header
    page_url = (header.target if header is not None else None) or target_uri
    if page_url is not None and not isinstance(page_url, str):
        return None   # numbers: msgspec and orjson read big integers differently
    meta = envelope.meta
    response = meta.response if meta is not None else None
    html = response.html if response is not None else None
    if html is None:
        return RecordLinks("not_html", "", page_url, None, [], False)
    base = None
    found = []
    for link in [lk for lk in html.Links if lk.path in _WANTED_PATHS]:
        url = link.url
        if link.path == IMG_PATH:
            alt = link.alt
            if not ((url is None or isinstance(url, str)) and (alt is None or isinstance(alt, str))):
                return None   # a number or object where a string belongs: the orjson path's str()
            found.append((url, alt))
        elif base is None and isinstance(url, str):
            base = url
    if page_url is None and found:
        return RecordLinks("missing_fields", "record has image links but no WARC-Target-URI",
                           None, base, found, False)
    head = html.Head
    return RecordLinks("links", "", page_url, base, found, False,
                       page_opt_out.from_wat_head({"Metas": head.Metas} if head is not None
                                                  else None) if found else None)


def wat_links(payload: bytes, target_uri: str | None = None) -> RecordLinks:
    """The image links of one WAT metadata record's JSON payload."""
    if _typed_decode is not None:
        found = _wat_links_typed(payload, target_uri)
        if found is not None:
            return found
    return wat_links_untyped(payload, target_uri)


def wat_links_untyped(payload: bytes, target_uri: str | None = None) -> RecordLinks:
    """wat_links with orjson (json for non-UTF-8 payloads): every shape of payload, and the
    reference the typed path is tested against."""
    try:
        doc, non_utf8 = parse_json_payload(payload)
    except (ValueError, UnicodeError) as exc:
        return RecordLinks("invalid_json", f"invalid JSON payload: {str(exc)[:200]}", target_uri,
                           None, [], False)
    envelope = doc.get("Envelope") if isinstance(doc, dict) else None
    if not isinstance(envelope, dict):
        return RecordLinks("missing_fields", "JSON payload has no Envelope object", target_uri,
                           None, [], non_utf8)
    header = envelope.get("WARC-Header-Metadata")
    page_url = (header.get("WARC-Target-URI") if isinstance(header, dict) else None) or target_uri
    meta = envelope.get("Payload-Metadata")
    response = meta.get("HTTP-Response-Metadata") if isinstance(meta, dict) else None
    html = response.get("HTML-Metadata") if isinstance(response, dict) else None
    if not isinstance(html, dict):  # request, warcinfo, non-HTML response: nothing to take
        return RecordLinks("not_html", "", page_url, None, [], non_utf8)
    links = html.get("Links", [])
    if not isinstance(links, list):
        return RecordLinks("missing_fields", "HTML-Metadata.Links is not a list", page_url,
                           None, [], non_utf8)
    # One quick pass keeps the few links that matter (a page has ~100 A@/href links per image).
    try:
        wanted = [lk for lk in links if lk.get("path") in _WANTED_PATHS]
    except (AttributeError, TypeError):  # a link that is not an object, or a path that is not a string
        wanted = [lk for lk in links if isinstance(lk, dict) and isinstance(lk.get("path"), str)
                  and lk["path"] in _WANTED_PATHS]
    base = None
    found = []
    for link in wanted:
        url = link.get("url")
        if link["path"] == IMG_PATH:
            alt = link.get("alt")
            found.append((url if url is None or isinstance(url, str) else str(url),
                          alt if alt is None or isinstance(alt, str) else str(alt)))
        elif base is None and isinstance(url, str):
            base = url
    if page_url is None and found:
        return RecordLinks("missing_fields", "record has image links but no WARC-Target-URI",
                           None, base, found, non_utf8)
    return RecordLinks("links", "", page_url, base, found, non_utf8,
                       page_opt_out.from_wat_head(html.get("Head")) if found else None)


# --- one file ---------------------------------------------------------------------------------------

@dataclass
class ExtractOptions:
    fmt: str = "wat"
    reader: str = "fastwarc"
    rules: LinkRules = field(default_factory=LinkRules)
    chunk_size: int = 1 << 20

    @classmethod
    def from_config(cls, section: dict[str, Any], fmt: str | None = None) -> "ExtractOptions":
        fmt = fmt or section.get("format", "wat")
        reader = section.get("reader", "fastwarc")
        if fmt not in FORMATS:
            raise ValueError(f"wat_extract.format must be one of {FORMATS}, got {fmt!r}")
        if reader not in READERS:
            raise ValueError(f"wat_extract.reader must be one of {READERS}, got {reader!r}")
        return cls(fmt=fmt, reader=reader, rules=LinkRules.from_config(section),
                   chunk_size=int(section.get("read_chunk_bytes", 1 << 20)))


def extract_stream(raw, source_file: str, opts: ExtractOptions,
                   outcome: FileOutcome | None = None) -> Iterator[Pair | Rejected | FileOutcome]:
    """Rows of one open binary stream: Pair and Rejected rows, then its FileOutcome (last).

    Never raises for bad input; `outcome.status` says ok / partial / failed.
    """
    from udfs.extract.warc_html import html_links, response_body  # selectolax: only for WARC input

    out = outcome or FileOutcome(source_file)
    t0 = time.perf_counter()
    crawl = crawl_of(source_file)
    rules = opts.rules
    is_wat = opts.fmt == "wat"
    want = "metadata" if is_wat else "response"
    state = _ReadState()
    by_type: dict[str, int] = {}
    min_len, max_len, pair_uid = rules.min_alt_length, rules.max_alt_length, ids.pair_uid
    canonical = urls.canonical_match
    fast_urls = {"http", "https"} <= set(rules.schemes)   # as Resolver's fast paths
    valid_date = warc_records.valid_date
    damage = state.log.damage      # problems of the record just read (udfs.extract.warc_records.ReadLog)
    try:
        for rec in _READER_FUNCS[opts.reader](raw, want, state, opts.chunk_size):
            if damage and (rec.payload is None or is_wat):
                yield _damaged_row(out, damage, rec.headers, source_file, crawl)
            if rec.payload is None:    # records of other types are only counted
                rtype = rec.rec_type
                by_type[rtype] = by_type.get(rtype, 0) + 1
                continue
            out.metadata_records += 1
            headers = rec.headers
            if is_wat:
                # page URL from the JSON envelope; the record header only when the JSON lacks it
                found = wat_links(rec.payload)
                if found.status == "missing_fields" and found.page_url is None and found.links:
                    target = _target_uri(headers, state.log)
                    if target:
                        found = found._replace(status="links", error_message="", page_url=target)
                unescape = rules.unescape_alt
            else:
                target = _target_uri(headers, state.log)
                body, ctype, problem = response_body(rec.payload, headers, target, state.log)
                if problem is not None:
                    found = RecordLinks(problem[0], problem[1], target, None, [], False)
                else:
                    found = html_links(body, target, ctype)
                    if found.charset == "detected":
                        out.records_charset_detected += 1
                if damage:       # the reader's and the HTTP layer's problems: one row per record
                    yield _damaged_row(out, damage, headers, source_file, crawl)
                unescape = False
            page_url = found.page_url
            if page_url and page_url[0] == "<":   # a WAT written from a WARC with <URI> values
                page_url, _ = warc_records.clean_uri(page_url)
                found = found._replace(page_url=page_url)
            if found.non_utf8:
                out.records_non_utf8 += 1
            record_id = headers.get("WARC-Record-ID") if found.status != "not_html" else None
            if found.status != "links":
                if found.status == "not_html":
                    out.records_not_html += 1
                    continue
                out.records_rejected += 1     # invalid_json, missing_fields, bad_html, bad_http
                yield Rejected(None, None, found.page_url, source_file, record_id,
                               found.status, found.error_message, "record", crawl)
                if not found.links:
                    continue
            out.html_records += 1
            date = headers.get("WARC-Date")
            if date is not None and not valid_date(date):
                out.records_bad_date += 1
                date = None
            links = found.links
            out.links_seen += len(links)
            resolver = urls.Resolver(page_url, found.base_href, rules.schemes)
            absolute = resolver.absolute
            opt_out = found.page_opt_out
            for raw_url, raw_alt in links:
                # Hot path, inlined: a plain alt-text of acceptable length and a usable URL.
                # Everything else goes through LinkRules.judge, which gives the same result.
                if raw_alt is not None and "&" not in raw_alt and "\x00" not in raw_alt:
                    text = " ".join(raw_alt.split())
                    if min_len <= len(text) <= max_len:
                        # An absolute URL already canonical (with a path, no dot segment) is
                        # kept as it is: Resolver.absolute's first case without the call.
                        m = (canonical(raw_url) if fast_urls and raw_url is not None
                             and raw_url.startswith(_HTTP_PREFIXES) else None)
                        if (m is not None and "/." not in raw_url
                                and m.end(3) > m.end(2)):
                            url = raw_url
                        else:
                            try:
                                url = absolute(raw_url)
                            except urls.UrlError:
                                url = None
                        if url is not None:
                            out.pairs_kept += 1
                            # tuple.__new__ skips NamedTuple's Python-level __new__; the uid is
                            # ids.pair_uid inlined (same bytes, same digest)
                            yield _new_tuple(Pair, (
                                _blake2b(f"{url}\t{text}".encode("utf-8", "surrogatepass"),
                                         digest_size=8).hexdigest(),
                                url, text, page_url, source_file, record_id, date, False,
                                opt_out, crawl))
                            continue
                url, text, truncated, status, message = rules.judge(resolver, raw_url, raw_alt,
                                                                    unescape)
                if status is None:
                    out.pairs_kept += 1
                    out.alt_truncated += truncated
                    yield _new_tuple(Pair, (pair_uid(url, text), url, text, page_url,
                                            source_file, record_id, date, truncated,
                                            found.page_opt_out, crawl))
                else:
                    out.pairs_rejected += 1
                    yield Rejected(url, text, page_url, source_file, record_id,
                                   status, message, "link", crawl)
    except InputProblem as exc:
        _fail(out, exc.reason, str(exc), by_type)
    except BaseException as exc:  # noqa: BLE001 - a reader error on bad bytes must not kill the task
        # (FastWARC's Rust panics arrive as PanicException, a BaseException)
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)) or is_transient(exc):
            raise
        _fail(out, "unreadable", f"{type(exc).__name__}: {str(exc)[:300]}", by_type)
    if damage:   # a reader that stopped inside a damaged record
        yield _damaged_row(out, damage, None, source_file, crawl)
    if out.metadata_records:
        by_type[want] = by_type.get(want, 0) + out.metadata_records
    _finish(out, state, by_type)
    if out.records_read:
        # each record lost in a file that was read is also a rejected row (level=record);
        # a file with nothing readable has only its failed outcome
        for reason, message in state.log.events:
            yield Rejected(None, None, None, source_file, None, reason, message[:500], "record",
                           crawl)
    out.seconds = round(time.perf_counter() - t0, 4)
    yield out


def _damaged_row(out: FileOutcome, damage: list, headers, source_file: str, crawl: str
                 ) -> Rejected:
    """The rejected row (status bad_record) of one record read despite `damage`, which is
    counted in `out` and cleared. The record's pairs, if any, are kept."""
    out.records_damaged += 1
    reasons = out.damage_reasons
    for reason, _ in damage:
        reasons[reason] = reasons.get(reason, 0) + 1
    record_id = target = None
    if headers is not None:
        record_id = headers.get("WARC-Record-ID")
        target, _ = warc_records.clean_uri(headers.get("WARC-Target-URI"))
    message = "; ".join(f"{reason}: {text}" for reason, text in damage)[:1000]
    damage.clear()
    return Rejected(None, None, target, source_file, record_id, "bad_record", message, "record",
                    crawl)


def _target_uri(headers, log: warc_records.ReadLog) -> str | None:
    """WARC-Target-URI without the angle brackets some tools write (`<https://...>`)."""
    target = headers.get("WARC-Target-URI")
    if target and (target[0] == "<" or target[0] == " "):
        target, bracketed = warc_records.clean_uri(target)
        if bracketed:
            log.quirk("angle_bracket_uri")
    return target


def _finish(out: FileOutcome, state: _ReadState, by_type: dict) -> None:
    """Copy what the reader learned into the outcome; losses make the file partial/failed."""
    log = state.log
    out.records_read = sum(by_type.values())
    out.records_by_type = by_type
    out.compressed_bytes = state.compressed_bytes or log.compressed_bytes
    out.reader_used = state.reader
    out.archive_format = log.format
    out.compression = log.compression
    out.lost_reasons = dict(log.lost)
    out.records_lost = sum(log.lost.values())
    out.bytes_skipped = log.bytes_skipped
    quirks = dict(log.quirks)
    if state.fallback:
        quirks["fast_reader_handed_over"] = 1
    out.quirks = quirks
    if out.status != "ok":
        return
    if log.lost or log.bytes_skipped or log.truncated:
        if out.records_read == 0:
            out.status = "failed"
            out.error_message = ("not_warc: no WARC or ARC record found"
                                 if not log.truncated else "; ".join(log.messages))
        else:
            out.status = "partial"
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(log.lost.items()) if v)
            first = log.messages[0] if log.messages else "bytes skipped"
            out.error_message = (f"{first} ({out.records_lost} records lost"
                                 + (f": {reasons}" if reasons else "")
                                 + f"; {log.bytes_skipped} bytes skipped; "
                                   f"{out.records_read} records read)")
    elif out.records_read == 0:
        out.status = "failed"
        out.error_message = "not_warc: no WARC or ARC record found"


# Network and resource failures are not bad input: raising them fails the task, and Spark's
# retry (spark.task.maxFailures) reads the file again, instead of a file marked partial for good.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "ClientConnectionError", "ClientOSError", "ServerDisconnectedError",
    "ClientPayloadError", "ServerTimeoutError",
})


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry of the same file may not see again (connection resets, timeouts,
    throttling, out of memory)."""
    if isinstance(exc, (MemoryError, ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    status = getattr(exc, "status", None)   # aiohttp.ClientResponseError (https via fsspec)
    return isinstance(status, int) and (status == 429 or status >= 500)


def _fail(out: FileOutcome, reason: str, message: str, by_type: dict | None = None) -> None:
    """A file that yielded something before its problem is `partial`, else `failed`."""
    read = (sum(by_type.values()) + out.metadata_records) if by_type is not None else out.records_read
    out.status = "partial" if read > 0 else "failed"
    out.error_message = message if message.startswith(reason) else f"{reason}: {message}"


def extract_file(uri: str, opts: ExtractOptions, storage_options: dict | None = None,
                 ) -> Iterator[Pair | Rejected | FileOutcome]:
    """`extract_stream` over a path/URI opened with fsspec; a missing or unopenable file yields
    only a `failed` outcome."""
    from udfs import fsio

    t0 = time.perf_counter()
    try:
        fh = fsio.open_uri(uri, "rb", storage_options, block_size=opts.chunk_size)
    except FileNotFoundError:
        yield _failed(uri, "file_not_found", f"file_not_found: {uri}", t0)
        return
    except Exception as exc:  # noqa: BLE001 - permissions, bad bucket...
        if is_transient(exc):
            raise
        yield _failed(uri, "open_failed", f"open_failed: {type(exc).__name__}: {str(exc)[:300]}", t0)
        return
    try:
        yield from extract_stream(fh, uri, opts)
    finally:
        try:
            fh.close()
        except Exception:  # noqa: BLE001
            pass


def _failed(uri: str, reason: str, message: str, t0: float) -> FileOutcome:
    out = FileOutcome(uri, status="failed", error_message=message)
    out.seconds = round(time.perf_counter() - t0, 4)
    return out


def outcome_dict(outcome: FileOutcome) -> dict:
    return asdict(outcome)


# --- paths lists ------------------------------------------------------------------------------------

def read_paths_list(uri: str, base: str, storage_options: dict | None = None) -> list[str]:
    """Entries of a paths file (plain or .gz, like Common Crawl's wat.paths.gz). Relative entries
    are resolved against `base`; blank lines and `#` comments are skipped."""
    import gzip

    from udfs import fsio

    with fsio.open_uri(uri, "rb", storage_options) as fh:
        head = fh.read(2)
        fh.seek(0)
        stream = gzip.GzipFile(fileobj=fh) if head == _GZIP_MAGIC else fh
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
        out = []
        for line in text:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            out.append(resolve_path(entry, base))
        return out


def resolve_path(entry: str, base: str) -> str:
    """`crawl-data/...` -> `<base>crawl-data/...`; absolute paths and URIs are kept."""
    if "://" in entry or entry.startswith("/") or not base:
        return entry
    return base.rstrip("/") + "/" + entry.lstrip("/")
