"""The HTTP response inside a WARC `response` record (or an ARC record), read tolerantly.

Crawlers and archive tools do not all store the same bytes: some keep the message as it came off
the wire (chunked, gzip-encoded), others store the decoded body but keep the original headers
(`Transfer-Encoding: chunked` over a de-chunked body, `Content-Encoding: gzip` over plain HTML:
pywb/warcprox, ClueWeb09, old Common Crawl). So the headers are treated as claims: a decoding is
tried, and when it does not fit the stored bytes the raw body is kept. Which happened is counted
(`quirks`), never fatal. Header lines may end in CRLF or a bare LF; a missing or garbled status
line is tolerated.
"""

from __future__ import annotations

import re
import zlib
from typing import NamedTuple

MAX_DECODED = 64 << 20          # a Content-Encoding that inflates past this is cut (gzip bomb)
_STATUS = re.compile(rb"HTTP/\d(?:\.\d)?\s+(\d{3})")
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
_HTML_START = re.compile(rb"\s*(?:<!doctype|<html|<head|<body|<\?xml|<!--)", re.I)


class HttpResponse(NamedTuple):
    status: int | None
    headers: dict            # lower-case name -> value (the first of repeated headers)
    body: bytes
    quirks: tuple            # e.g. ("bare_lf_http_headers", "te_chunked_raw", "ce_gzip_raw")

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


def parse_response(block: bytes) -> HttpResponse:
    """Status, headers and decoded body of an HTTP response message."""
    quirks: list[str] = []
    crlf = block.find(b"\r\n\r\n")
    lf = block.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        head, body = block[:crlf], block[crlf + 4:]
    elif lf >= 0:
        head, body = block[:lf], block[lf + 2:]
        quirks.append("bare_lf_http_headers")
    else:
        head, body = block, b""
    if _HTML_START.match(block[:64]):
        # no HTTP header at all: the record holds the document itself
        return HttpResponse(None, {"content-type": "text/html"}, block, ("http_headers_missing",))
    lines = head.split(b"\n")
    m = _STATUS.match(lines[0].strip())
    status = int(m.group(1)) if m else None
    if m is None:
        quirks.append("http_status_line_missing")
        if b":" not in lines[0]:
            lines = lines[1:]          # a garbled status line
    elif crlf >= 0 and b"\r" not in lines[0] and "bare_lf_http_headers" not in quirks:
        quirks.append("bare_lf_http_headers")
    headers: dict[str, str] = {}
    for line in (lines[1:] if m else lines):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().decode("latin-1").lower()
        if key not in headers:
            headers[key] = value.strip().decode("latin-1")
    body = _undo_transfer_encoding(body, headers.get("transfer-encoding"), quirks)
    ctype = (headers.get("content-type") or "text/html").lower()
    textual = "html" in ctype or "xml" in ctype or ctype.startswith("text/")
    body = _undo_content_encoding(body, headers.get("content-encoding"), quirks, textual)
    return HttpResponse(status, headers, body, tuple(quirks))


def _undo_transfer_encoding(body: bytes, te: str | None, quirks: list) -> bytes:
    if not te or "chunked" not in te.lower():
        return body
    out = dechunk(body)
    if out is None:
        quirks.append("te_chunked_raw")       # the stored body is not chunked: keep it
        return body
    quirks.append("te_chunked_decoded")
    return out


def dechunk(body: bytes) -> bytes | None:
    """The de-chunked body, or None when `body` does not start with a chunk header. A body cut
    inside a chunk keeps the chunks read so far."""
    pos = 0
    parts = []
    n = len(body)
    while pos < n:
        m = _CHUNK_SIZE.match(body, pos)
        if m is None:
            if not parts:
                return None
            break                              # trailing garbage after the last chunk
        size = int(m.group(1), 16)
        pos = m.end()
        if size == 0:
            break
        parts.append(body[pos:pos + size])
        pos += size
        if body[pos:pos + 2] == b"\r\n":
            pos += 2
        elif body[pos:pos + 1] == b"\n":
            pos += 1
    if not parts and not (m and int(m.group(1), 16) == 0):
        return None
    return b"".join(parts)


def _undo_content_encoding(body: bytes, ce: str | None, quirks: list, textual: bool = True
                           ) -> bytes:
    """Undo `ce` when it fits the stored body. `textual`: the Content-Type says the body is a
    document, so a body that neither decodes nor is text is damaged (an image's stored bytes
    are not judged, only compressed-looking ones)."""
    if not body or not ce:
        return body
    if "," in ce:     # `gzip, br`: applied in order, undone in reverse
        for enc in reversed([e for e in ce.split(",") if e.strip()]):
            body = _undo_content_encoding(body, enc, quirks, textual)
        return body
    enc = ce.strip().lower()
    if enc in ("identity", "none", ""):
        return body
    corrupt = []
    if enc in ("gzip", "x-gzip", "deflate"):
        if body[:2] == b"\x1f\x8b":
            out = _inflate(body, 31, corrupt=corrupt)
        elif enc == "deflate":
            out = _inflate(body, 15 if body[:1] == b"\x78" else -15, corrupt=corrupt)
        else:
            out = None
    elif enc == "br":
        out = _brotli(body)
    elif enc == "zstd":
        out = _zstd(body)
    else:
        out = None
    name = enc.replace("-", "_")[:12]
    if out is None:
        # the stored body is decoded already (quirk `_raw`), or it does not decode and is no
        # text either (`_failed`: a damaged record, also a rejected row)
        damaged = _compressed_magic(body) or (textual and not looks_like_text(body))
        quirks.append(f"ce_{name}_{'failed' if damaged else 'raw'}")
        return body
    quirks.append(f"ce_{name}_decoded")
    if corrupt:
        quirks.append(f"ce_{name}_corrupt")    # inflated up to a corruption: a damaged record
    return out


def _compressed_magic(body: bytes) -> bool:
    return body[:2] == b"\x1f\x8b" or body[:4] == b"\x28\xb5\x2f\xfd"


def looks_like_text(body: bytes) -> bool:
    """True when the first bytes can be a document (markup or text in any charset): no gzip or
    zstd magic, and control bytes other than whitespace (and ISO-2022's ESC) under 5%."""
    head = body[:512]
    if _compressed_magic(head):
        return False
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls * 20 < max(1, len(head))


_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"


def _inflate(body: bytes, wbits: int, corrupt: list | None = None, step: int = 64
             ) -> bytes | None:
    """Inflated body; a stream that turns corrupt (noted in `corrupt`) or ends midway keeps
    what inflated before, None when nothing did. One call for a sound stream; a corrupt one is
    inflated again `step` bytes at a time, and the step that fails byte by byte."""
    try:
        return zlib.decompressobj(wbits).decompress(body, MAX_DECODED) or None
    except zlib.error:
        pass
    d = zlib.decompressobj(wbits)
    parts, size = [], 0
    for i in range(0, len(body), step):
        saved = d.copy()
        try:
            out = d.decompress(body[i:i + step], MAX_DECODED - size)
        except zlib.error:
            if corrupt is not None:
                corrupt.append(i)
            d = saved
            for j in range(i, min(i + step, len(body))):    # keep the output before the fault
                try:
                    parts.append(d.decompress(body[j:j + 1]))
                except zlib.error:
                    break
            break
        parts.append(out)
        size += len(out)
        if d.eof or size >= MAX_DECODED:
            break
    out = b"".join(parts)
    return out if out else None


def _brotli(body: bytes) -> bytes | None:
    try:
        import brotli
    except ImportError:
        return None
    try:
        return brotli.decompress(body) or None
    except Exception:  # noqa: BLE001 - brotli.error: not brotli data
        return None


def _zstd(body: bytes) -> bytes | None:
    try:
        import zstandard
    except ImportError:
        return None
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(body) or None
    except Exception:  # noqa: BLE001 - zstandard.ZstdError: not zstd data
        return None
