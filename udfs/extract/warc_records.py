"""A tolerant WARC/ARC record reader for what real crawlers wrote. Pure Python (zlib, re).

The fast path of `udfs.extract.wat` is FastWARC; it stops (or raises) on input outside the WARC 1.0/1.1
grammar. This reader is what the extractor falls back to, from the record where FastWARC stopped,
and what it uses for every file FastWARC cannot open. It never raises for bad bytes: every record
is read, or counted as lost with a reason, and reading resumes at the next record boundary.

- Compression is detected from the content, not the file name: gzip (one member per record, one
  stream for the whole file, or a truncated last member, whose readable records are kept), zstd
  (`.warc.zst`, when the `zstandard` package is installed) or none.
- Records: `WARC/0.17`, `0.18`, `1.0`, `1.1` headers ending in CRLF or bare LF, continuation lines,
  and ARC v1/v2 records (`filedesc://` files, Common Crawl 2008-2012, Internet Archive), which are
  given WARC-style headers (`WARC-Target-URI`, `WARC-Date`).
- A `Content-Length` that lies is noticed when the bytes after the block are not the next record
  (or the end): the block then runs to the next `WARC/x.y` header line. A corrupt gzip member is
  skipped to the next gzip header. Garbage between records is skipped to the next header line.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterator, NamedTuple

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MEMBER = re.compile(rb"\x1f\x8b\x08")
# A record's first line. At the start of a buffer, or after a newline.
_WARC_LINE = re.compile(rb"WARC/\d\.\d+\r?\n")
_NEXT_WARC = re.compile(rb"\nWARC/\d\.\d+\r?\n")
_ARC_DATE = re.compile(r"\d{14}")
_LF = re.compile(rb"\n")
_NEXT_ARC = re.compile(rb"\n(?:https?|dns|filedesc|ftp):")
BAD_MEMBER = b"\x00BAD-GZIP-MEMBER\x00\n"
MAX_HEADER = 1 << 16          # a record header longer than this is garbage
MAX_RESYNC_SCAN = 64 << 20    # how far past a lying Content-Length the next header is looked for
MAX_SKIPPED_IN_MEMORY = 8 << 20   # an unwanted record longer than this is streamed past
MAX_EVENTS = 1000             # lost records reported one by one (the counts are always complete)
# quirks of udfs.extract.http_message that mean the body did not decode (ce_gzip_failed, ce_br_corrupt)
DAMAGE_SUFFIXES = ("_failed", "_corrupt")
DAMAGE_MESSAGES = {
    "failed": "Content-Encoding {} does not decode the stored body, which is not plain text "
              "either: read as stored",
    "corrupt": "Content-Encoding {}: the stored body turns corrupt midway: read as far as it "
               "decoded",
}


class Record(NamedTuple):
    rec_type: str        # warcinfo, response, request, metadata, revisit, resource, conversion, ...
    headers: "Headers"
    block: bytes | None  # None when the record type was not wanted (not kept in memory)
    offset: int          # offset of the record in the decompressed stream
    quirks: tuple        # quirk names seen on this record (bare_lf_headers, content_length_mismatch)


class Headers(dict):
    """WARC headers by lower-case name, with a case-insensitive `get` (FastWARC's interface)."""

    def get(self, name, default=None):  # noqa: D102 - dict.get with a case-insensitive key
        return dict.get(self, name.lower(), default)


class ReadLog:
    """What the reader learned besides the records: losses by reason, quirks, compression."""

    def __init__(self):
        self.lost: dict[str, int] = {}        # reason -> records (or record fragments) lost
        self.quirks: dict[str, int] = {}
        self.bytes_skipped = 0                # decompressed bytes skipped to resynchronise
        self.compression = "none"
        self.format = "warc"
        self.compressed_bytes = 0
        self.truncated = False                # the input ended inside a gzip member / a record
        self.messages: list[str] = []         # first few problems, for the file's error_message
        self.events: list[tuple[str, str]] = []   # (reason, message) per record lost (capped)
        self.start = 0                        # file offset where the reader began
        # problems of the record just read that did not stop it being read (a Content-Length that
        # lies, a body that does not decode): the extractor turns them into one rejected row
        # (status bad_record) for that record and clears the list
        self.damage: list[tuple[str, str]] = []

    def lose(self, reason: str, message: str, n: int = 1) -> None:
        self.lost[reason] = self.lost.get(reason, 0) + n
        if len(self.messages) < 3:
            self.messages.append(f"{reason}: {message}")
        if n and len(self.events) < MAX_EVENTS:
            self.events.append((reason, message))

    def quirk(self, name: str, n: int = 1) -> None:
        self.quirks[name] = self.quirks.get(name, 0) + n
        if name.endswith(DAMAGE_SUFFIXES) and name.startswith("ce_"):
            # udfs.extract.http_message: a body that does not decode (ce_<encoding>_failed / _corrupt)
            cut = name.rfind("_")
            self.damage.append((name, DAMAGE_MESSAGES[name[cut + 1:]].format(name[3:cut])))

    def damaged(self, reason: str, message: str) -> None:
        """The record being read is damaged but read (see `damage`)."""
        self.damage.append((reason, message))

    def where(self, offset: int) -> str:
        """A record's place for messages: its file offset, or inside compressed data the
        uncompressed offset from where reading began."""
        if self.compression == "none":
            return f"at byte {offset}"
        return f"at uncompressed byte {offset} of the {self.compression} data from file byte {self.start}"


# --- decompression --------------------------------------------------------------------------------

def sniff(head: bytes) -> str:
    """Compression of a file from its first bytes: gzip | zstd | none | empty."""
    if not head:
        return "empty"
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or (head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50):
        return "zstd"           # a zstd frame, or a skippable frame (WARC-zstd's dictionary)
    return "none"


def _gzip_chunks(raw, log: ReadLog, chunk_size: int, offset: int = 0,
                 max_out: int = 4 << 20) -> Iterator[bytes]:
    """Decompressed bytes of a gzip file, member after member. A corrupt member is skipped to the
    next gzip header (counted); a truncated last member yields what it decompressed."""
    d = zlib.decompressobj(31)
    tail = b""
    in_member = False
    member_start = offset
    consumed = offset                # file offset of `tail`
    eof = False
    while True:
        if not tail and not eof:
            tail = raw.read(chunk_size)
            if not tail:
                eof = True
            log.compressed_bytes += len(tail)
        if not tail:
            if in_member:
                log.truncated = True
                log.lose("truncated_gzip", f"file ends inside the gzip member at byte {member_start}", 0)
            return
        if not in_member:
            stripped = tail.lstrip(b"\x00")    # trailing/padding NULs between members
            consumed += len(tail) - len(stripped)
            tail = stripped
            if not tail:
                continue
            if len(tail) < 3 and not eof:
                more = raw.read(chunk_size)
                log.compressed_bytes += len(more)
                eof = not more
                tail += more
            if tail[:2] != GZIP_MAGIC:
                skipped = _skip_to_member(tail)
                if skipped is None:
                    more = b"" if eof else raw.read(chunk_size)
                    log.compressed_bytes += len(more)
                    if not more:
                        log.lose("garbage_after_gzip", f"{len(tail)} bytes that are not gzip at "
                                                       f"byte {consumed}", 0)
                        log.bytes_skipped += len(tail)
                        return
                    keep = tail[-2:]
                    consumed += len(tail) - 2
                    log.bytes_skipped += len(tail) - 2
                    tail = keep + more
                    continue
                log.lose("garbage_between_gzip_members", f"{skipped} bytes at byte {consumed}", 0)
                log.bytes_skipped += skipped
                consumed += skipped
                tail = tail[skipped:]
                continue
            d = zlib.decompressobj(31)
            in_member = True
            member_start = consumed
        try:
            out = d.decompress(tail, max_out)
        except zlib.error as exc:
            # Skip this member: look for the next gzip header after its first byte.
            log.lose("bad_gzip_member", f"corrupt gzip member at byte {member_start}: {exc}")
            yield BAD_MEMBER    # tells the record layer that bytes are missing here
            in_member = False
            rest = tail[1:] if consumed == member_start else tail
            consumed += len(tail) - len(rest)
            tail = rest
            nxt = _skip_to_member(tail)
            while nxt is None and not eof:
                more = raw.read(chunk_size)
                log.compressed_bytes += len(more)
                if not more:
                    eof = True
                    break
                consumed += max(0, len(tail) - 2)
                tail = tail[-2:] + more
                nxt = _skip_to_member(tail)
            if nxt is None:
                return
            consumed += nxt
            tail = tail[nxt:]
            continue
        if d.eof:
            used = len(tail) - len(d.unused_data)
            consumed += used
            tail = d.unused_data
            in_member = False
        else:
            consumed += len(tail) - len(d.unconsumed_tail)
            tail = d.unconsumed_tail
        if out:
            yield out


def _skip_to_member(data: bytes) -> int | None:
    m = _GZIP_MEMBER.search(data)
    return m.start() if m else None


def _zstd_chunks(raw, log: ReadLog, chunk_size: int) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:
        log.lose("zstd_unsupported", "zstd-compressed file and the zstandard package is not "
                                     "installed")
        return
    head = raw.read(8)
    log.compressed_bytes += len(head)
    dict_data = None
    # WARC-zstd: an optional skippable frame (magic 0x184D2A5D) holding the dictionary
    if head[:4] == b"\x5d\x2a\x4d\x18":
        size = int.from_bytes(head[4:8], "little")
        data = raw.read(size)
        log.compressed_bytes += len(data)
        if data[:4] == ZSTD_MAGIC:
            data = zstandard.ZstdDecompressor().decompress(data)
        dict_data = zstandard.ZstdCompressionDict(data)
        head = b""
    dctx = zstandard.ZstdDecompressor(dict_data=dict_data) if dict_data else zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    buf = head
    while True:
        if not buf:
            buf = raw.read(chunk_size)
            log.compressed_bytes += len(buf)
            if not buf:
                return
        try:
            out = obj.decompress(buf)
        except zstandard.ZstdError as exc:
            log.lose("bad_zstd", f"corrupt zstd data: {exc}")
            return
        buf = obj.unused_data if obj.eof else b""
        if obj.eof:
            obj = dctx.decompressobj()
        if out:
            yield out


def _plain_chunks(raw, log: ReadLog, chunk_size: int, head: bytes = b"") -> Iterator[bytes]:
    if head:
        yield head
    while True:
        data = raw.read(chunk_size)
        if not data:
            return
        log.compressed_bytes += len(data)
        yield data


# --- the record layer -----------------------------------------------------------------------------

class _Buffer:
    """Decompressed bytes with look-ahead: `ensure(n)` reads until `n` bytes follow `pos`.

    Callers hold absolute indices into `buf` while they read one record, so consumed bytes are
    dropped only where no index is held: `compact()` between records, and the pos-only moves
    `discard` and `skip_to` (which stream past data in bounded memory)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self.buf = bytearray()
        self.pos = 0
        self.base = 0            # stream offset of buf[0]
        self.eof = False

    def ensure(self, n: int) -> bool:
        while len(self.buf) - self.pos < n and not self.eof:
            self._more()
        return len(self.buf) - self.pos >= n

    def _more(self, compact: bool = False) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            self.eof = True
        else:
            if compact:
                self.compact()
            self.buf += chunk

    def compact(self) -> None:
        """Drop consumed bytes now and then; only where the caller holds no index into `buf`."""
        if self.pos > (1 << 20):
            del self.buf[:self.pos]
            self.base += self.pos
            self.pos = 0

    def find(self, pattern: re.Pattern, start: int, limit: int) -> int:
        """Absolute index in buf of `pattern` at or after `start`, reading up to `limit` more bytes."""
        scanned = start
        while True:
            m = pattern.search(self.buf, scanned)
            if m:
                return m.start()
            if self.eof or len(self.buf) - start > limit:
                return -1
            scanned = max(start, len(self.buf) - 64)
            self._more()

    def offset(self) -> int:
        return self.base + self.pos

    def discard(self, n: int) -> int:
        """Move `pos` forward by `n` bytes without holding them; -> bytes missing at the end."""
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail <= 0:
                if self.eof:
                    return n
                self._more(compact=True)
                continue
            take = min(avail, n)
            self.pos += take
            n -= take
        return 0

    def skip_to(self, pattern: re.Pattern) -> int:
        """Move `pos` past the first byte of the next match of `pattern` (its leading newline)
        or to the end, in bounded memory; -> bytes skipped."""
        skipped = 0
        while True:
            m = pattern.search(self.buf, self.pos)
            if m:
                end = m.start() + 1
                skipped += end - self.pos
                self.pos = end
                return skipped
            keep = min(64, len(self.buf) - self.pos)     # a match may span two chunks
            skipped += len(self.buf) - self.pos - keep
            self.pos = len(self.buf) - keep
            if self.eof:
                skipped += keep
                self.pos = len(self.buf)
                return skipped
            self._more(compact=True)


def open_chunks(raw, log: ReadLog, chunk_size: int, offset: int = 0) -> Iterator[bytes]:
    """Decompressed chunks of a file, its compression detected from its first bytes."""
    head = raw.read(4)
    log.compressed_bytes += len(head)
    kind = sniff(head)
    log.compression = kind
    if kind == "gzip":
        log.compressed_bytes -= len(head)
        return _gzip_chunks(_Prepend(head, raw), log, chunk_size, offset)
    if kind == "zstd":
        log.compressed_bytes -= len(head)
        return _zstd_chunks(_Prepend(head, raw), log, chunk_size)
    return _plain_chunks(raw, log, chunk_size, head)


class _Prepend:
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, raw):
        self._head, self._raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            if n is None or n < 0:
                return head + self._raw.read()
            return head + (self._raw.read(n - len(head)) if n > len(head) else b"")
        return self._raw.read(n)


def read_records(raw, wanted: frozenset, log: ReadLog, chunk_size: int = 1 << 20,
                 skip: int = 0, offset: int = 0) -> Iterator[Record]:
    """Records of one binary stream, blocks read for the `wanted` types only. The first `skip`
    records are parsed but not yielded (resuming after a reader that already gave them);
    `offset` is where `raw` stands in the file (for messages)."""
    b = _Buffer(open_chunks(raw, log, chunk_size, offset))
    log.start = offset
    if log.compression == "none":
        b.base = offset          # record offsets are file offsets
    b.ensure(16)
    start = bytes(b.buf[b.pos:b.pos + 16]).lstrip(b"\r\n\t ")
    if start.startswith(b"filedesc://"):
        log.format = "arc"
        yield from _arc_records(b, wanted, log, skip)
        return
    n = 0
    nothing: frozenset = frozenset()
    while True:
        rec = _next_warc_record(b, wanted if n >= skip else nothing, log)
        if rec is None:
            return
        n += 1
        if n > skip:
            yield rec
        else:
            log.damage.clear()      # a record a previous reader gave already


def _skip_blank(b: _Buffer) -> None:
    while True:
        if not b.ensure(1):
            return
        if b.buf[b.pos] in (0x0D, 0x0A):
            b.pos += 1
        else:
            return


def _next_warc_record(b: _Buffer, wanted: frozenset, log: ReadLog) -> Record | None:
    while True:
        b.compact()
        _skip_blank(b)
        if not b.ensure(8):
            if len(b.buf) > b.pos:
                log.lose("garbage_at_end", f"{len(b.buf) - b.pos} bytes after the last record", 0)
                log.bytes_skipped += len(b.buf) - b.pos
                b.pos = len(b.buf)
            return None
        if b.buf[b.pos:b.pos + len(BAD_MEMBER)] == BAD_MEMBER:
            b.pos += len(BAD_MEMBER)          # counted by the gzip layer
            continue
        m = _WARC_LINE.match(b.buf, b.pos)
        if m is None:
            _resync(b, log, "garbage_before_record", "bytes that are not a WARC record")
            continue
        rec_start = b.pos
        hdr_end, sep_len = _header_end(b, rec_start)
        if hdr_end < 0:
            log.lose("bad_record_header", f"no end of the record header at offset {b.offset()}")
            b.pos = m.end()
            _resync(b, log, None, "")
            continue
        quirks: list[str] = []
        raw_header = bytes(b.buf[m.end():hdr_end])
        if sep_len == 2 or (b"\n" in raw_header and b"\r\n" not in raw_header):
            quirks.append("bare_lf_headers")
        headers = _parse_header_lines(raw_header)
        headers["warc-version"] = bytes(b.buf[rec_start + 5:m.end()]).strip().decode("ascii")
        body_start = hdr_end + sep_len
        rec_type = (headers.get("warc-type") or "").strip().lower() or "unknown"
        length = _content_length(headers.get("content-length"))
        offset = b.base + rec_start
        b.pos = body_start
        if length is None:
            quirks.append("missing_content_length")
            end = b.find(_NEXT_WARC, body_start, MAX_RESYNC_SCAN)
            end = end + 1 if end >= 0 else len(b.buf)
            block = bytes(b.buf[body_start:end]).rstrip(b"\r\n")
            b.pos = end
        elif length > MAX_SKIPPED_IN_MEMORY and rec_type not in wanted:
            # a large record that is not wanted (video, archive): streamed past, not held
            missing = b.discard(length)
            block = None
            if missing:
                quirks.append("truncated_record")
                _lose_tail(log, offset)
            elif not _record_follows(b, b.pos):
                quirks.append("content_length_mismatch")
                skipped = b.skip_to(_NEXT_WARC)
                log.damaged("content_length_mismatch",
                            f"Content-Length {length} of the record {log.where(offset)} does "
                            f"not end at a record boundary: {skipped} more bytes to the next record "
                            f"header, read by resync")
        else:
            b.ensure(length + 16)
            after = body_start + length
            if len(b.buf) >= after and (_record_follows(b, after)
                                        or b.buf[after:after + 4] == b"\r\n\r\n"):
                # (a block followed by its CRLFCRLF but not by a record: garbage comes next,
                # which the next call skips and counts)
                block = bytes(b.buf[body_start:after])
                b.pos = after
            else:
                # Content-Length lies (the block runs to the next record header), or the stream
                # ends inside this block (it is kept as far as it goes)
                nxt = b.find(_NEXT_WARC, body_start, MAX_RESYNC_SCAN)
                end = nxt + 1 if nxt >= 0 else len(b.buf)
                if nxt >= 0 or len(b.buf) >= after or not _cut_at_end(b, log, b"\n\n"):
                    quirks.append("content_length_mismatch")
                    log.damaged("content_length_mismatch",
                                f"Content-Length {length} of the record {log.where(offset)} "
                                f"does not end at a record boundary: its block runs to "
                                f"{'the next record header' if nxt >= 0 else 'the end'} "
                                f"({end - body_start} bytes), read by resync")
                else:
                    quirks.append("truncated_record")
                    _lose_tail(log, offset)
                block = bytes(b.buf[body_start:end]).rstrip(b"\r\n")
                b.pos = end
        for q in quirks:
            log.quirk(q)
        return Record(rec_type, Headers(headers), block if rec_type in wanted else None, offset,
                      tuple(quirks))


def _cut_at_end(b: _Buffer, log: ReadLog, terminator: bytes) -> bool:
    """The stream ended before the declared end of the last record: True when bytes were lost
    (a gzip member cut short, or a plain file that does not end like a complete record), False
    when only the Content-Length is wrong (the last member complete, or the record terminator
    present)."""
    if log.truncated:
        return True
    if log.compression in ("gzip", "zstd"):
        return False
    return not bytes(b.buf[-4:]).replace(b"\r", b"").endswith(terminator)


def _lose_tail(log: ReadLog, offset: int) -> None:
    log.truncated = True
    log.lose("truncated_record", f"the input ends inside the record at offset {offset}", 0)


def _record_follows(b: _Buffer, after: int) -> bool:
    """True when the bytes at `after` are the end of the stream or, past the CRLFs that end a
    record, the next record's `WARC/` line."""
    i = after
    b.ensure(after - b.pos + 16)
    n = len(b.buf)
    while i < n and b.buf[i] in (0x0D, 0x0A):
        i += 1
    if i >= n:
        return b.eof
    return b.buf[i:i + 5] == b"WARC/" or b.buf[i:i + 5] == BAD_MEMBER[:5]


def _header_end(b: _Buffer, start: int) -> tuple[int, int]:
    """Index of the blank line that ends a header block, and its length (4: CRLFCRLF, 2: LFLF...)."""
    scanned = start
    while True:
        crlf = b.buf.find(b"\r\n\r\n", scanned)
        lf = b.buf.find(b"\n\n", scanned)
        best = -1
        size = 0
        if crlf >= 0:
            best, size = crlf, 4
        if lf >= 0 and (best < 0 or lf < best):
            best, size = lf, 2
        # a mixed separator: "\n\r\n"
        mixed = b.buf.find(b"\n\r\n", scanned)
        if mixed >= 0 and (best < 0 or mixed < best):
            best, size = mixed, 3
        if best >= 0 and best - start <= MAX_HEADER:
            return best, size
        if best >= 0 or len(b.buf) - start > MAX_HEADER or b.eof:
            return -1, 0
        scanned = max(start, len(b.buf) - 4)
        b._more()


def _parse_header_lines(raw: bytes) -> dict:
    headers: dict[str, str] = {}
    last = None
    for line in raw.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and last is not None:
            headers[last] += " " + line.strip().decode("utf-8", "replace")
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        last = name.strip().decode("latin-1").lower()
        text = value.strip().decode("utf-8", "replace")
        headers[last] = text if last not in headers else headers[last]
    return headers


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def _resync(b: _Buffer, log: ReadLog, reason: str | None, what: str) -> None:
    """Skip to the next `WARC/x.y` line (or the end), counting the bytes skipped."""
    start = b.offset()
    skipped = b.skip_to(_NEXT_WARC)
    log.bytes_skipped += skipped
    if reason:
        log.lose(reason, f"{skipped} {what} at offset {start}")


# --- ARC ------------------------------------------------------------------------------------------

def _arc_records(b: _Buffer, wanted: frozenset, log: ReadLog, skip: int) -> Iterator[Record]:
    """ARC v1/v2: a header line `URL IP DATE MIME [...] LENGTH`, LF, LENGTH bytes, LF."""
    n = 0
    while True:
        b.compact()
        _skip_blank(b)
        if not b.ensure(1):
            return
        eol = b.find(_LF, b.pos, MAX_HEADER)
        if eol < 0 or eol - b.pos > MAX_HEADER:
            _arc_resync(b, log)
            continue
        line = bytes(b.buf[b.pos:eol]).rstrip(b"\r").decode("utf-8", "replace")
        parts = line.split(" ")
        offset = b.offset()
        if len(parts) < 5 or ":" not in parts[0]:
            _arc_resync(b, log)
            continue
        try:
            length = int(parts[-1])
        except ValueError:
            length = -1
        if length < 0:                    # `-1`, `abc`: a record without a usable length
            log.quirk("bad_arc_length")
            length = 0
        url, date = parts[0], parts[2]
        if len(parts) > 5 and not parts[-2].isdigit():
            # a URL with spaces: the fields are counted from the right (v1: 4 after the URL)
            fields_after = 4 if len(parts) < 10 else 9
            url = " ".join(parts[:len(parts) - fields_after])
            date = parts[len(parts) - fields_after + 1]
        body_start = eol + 1
        b.pos = body_start
        mime = parts[-2].lower() if len(parts) >= 5 else ""
        if length > MAX_SKIPPED_IN_MEMORY and "html" not in mime:
            complete = b.discard(length) == 0         # a large image/video: streamed past
            block = b""
        else:
            complete = b.ensure(length)
            block = bytes(b.buf[body_start:body_start + length])
            b.pos = min(len(b.buf), body_start + length)
        quirks: tuple = ()
        if not complete:
            if _cut_at_end(b, log, b"\n\n"):
                quirks = ("truncated_record",)
                _lose_tail(log, offset)
            else:
                quirks = ("content_length_mismatch",)
                log.damaged("content_length_mismatch",
                            f"ARC length {length} of the record {log.where(offset)} runs past the "
                            f"end of the file: read as far as it goes")
            log.quirk(quirks[0])
        if url.startswith("filedesc:"):
            rec_type = "warcinfo"
        else:
            rec_type = "response"
        headers = Headers({"warc-type": rec_type, "warc-target-uri": url,
                           "warc-date": arc_date(date), "warc-version": "arc",
                           "content-length": str(length)})
        n += 1
        if n > skip:
            yield Record(rec_type, headers, block if rec_type in wanted else None, offset, quirks)
        else:
            log.damage.clear()


def _arc_resync(b: _Buffer, log: ReadLog) -> None:
    start = b.offset()
    skipped = b.skip_to(_NEXT_ARC)
    log.bytes_skipped += skipped
    log.lose("garbage_before_record", f"{skipped} bytes that are not an ARC record at offset "
                                      f"{start}")


def arc_date(value: str) -> str | None:
    """ARC's 14-digit date `YYYYMMDDhhmmss` as a WARC-Date, None when it is not one."""
    if not _ARC_DATE.fullmatch(value or ""):
        return value or None
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}T{value[8:10]}:{value[10:12]}:{value[12:14]}Z"


# --- header values ----------------------------------------------------------------------------------

_WARC_DATE = re.compile(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])(T([01]\d|2[0-3]):[0-5]\d"
                        r"(:([0-5]\d|60)(\.\d{1,9})?)?Z)?")


def clean_uri(value: str | None) -> tuple[str | None, bool]:
    """-> (URI, had_brackets). `<https://...>` (the WARC 1.0 grammar's example form) loses its
    angle brackets; surrounding whitespace is dropped."""
    if not value:
        return None, False
    if value[0] == "<" or value[0] in " \t":
        v = value.strip()
        if v[:1] == "<" and v[-1:] == ">":
            return v[1:-1].strip() or None, True
        return v or None, False
    return value, False


def valid_date(value: str | None) -> bool:
    """True for a W3C-DTF date as WARC-Date requires (`2024-05-18T10:20:30Z`, shorter forms too)."""
    return bool(value) and _WARC_DATE.fullmatch(value) is not None
