"""Synthetic WARC/ARC files, written byte for byte, for each quirk real crawlers produce that the
real fixtures do not show (issue 12). Each file comes with what extraction must find, declared by
construction: the pages' image URLs and alt-texts, and the records lost, if any.

The quirks, after what real archives were measured to hold:
- `chunked_raw`: `Transfer-Encoding: chunked` over a body stored de-chunked (pywb/warcprox, iana.org)
- `chunked_real`: a body really stored chunked (and one really gzip-encoded)
- `ce_mismatch`: `Content-Encoding: gzip` over a plain body (old Common Crawl, ClueWeb09)
- `clueweb`: WARC/0.18, bare-LF WARC and HTTP headers, invalid WARC-Date values, EUC-JP pages
- `charsets`: EUC-JP and Shift_JIS (declared in <meta>, and undeclared), GB18030, Big5,
  windows-1251, KOI8-R
- `lying_length`: a `Content-Length` too long and one too short in the middle of a file
  (one gzip member per record, and uncompressed)
- `garbage`: bytes that are no record between records, and a corrupt gzip member
- `truncated`: a WARC whose last gzip member is cut
- `arc`: an ARC v1 file (`filedesc://`), plain and one gzip member per record
- `no_status_line`: an HTTP response without its status line, and one with no HTTP header at all

API: `quirk_files(folder) -> dict[name, QuirkFile]`.
"""

from __future__ import annotations

import gzip
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_HOST = "https://img.example.org"


@dataclass
class QuirkFile:
    path: str
    pairs: list[tuple[str, str]]                       # expected (url, text), in file order
    records: int                                       # records a reader must see
    status: str = "ok"
    lost: int = 0                                      # records lost (unreadable)
    quirks: dict[str, int] = field(default_factory=dict)   # quirk -> at least this count
    bad_dates: int = 0
    charset_detected: int = 0


@dataclass
class _Page:
    url: str
    html: bytes
    pairs: list[tuple[str, str]]


def page(n: int, alts: list[str], charset: str = "utf-8", declare: str | None = "meta",
         host: str = "https://www.example.org", filler: int = 0) -> _Page:
    """An HTML page whose images have relative src values (resolved against its URL)."""
    url = f"{host}/dir/page{n}.html"
    meta = f'<meta charset="{charset}">' if declare == "meta" else ""
    imgs, pairs = [], []
    for i, alt in enumerate(alts):
        src = f"{IMAGE_HOST}/p{n}/i{i}.jpg" if i % 2 else f"img/p{n}-{i}.png"
        imgs.append(f'<img src="{src}" alt="{alt}">')
        absolute = src if i % 2 else f"https://www.example.org/dir/img/p{n}-{i}.png"
        pairs.append((absolute.replace("https://www.example.org", host), alt))
    text = "".join(f"<p>{a} {a}</p>" for a in alts)
    if filler:   # incompressible text before the images (so a cut member holds none of them)
        rng = random.Random(n)
        text += "<p>" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(filler)) + "</p>"
    html = (f"<!DOCTYPE html><html><head>{meta}<title>{alts[0] if alts else 'x'}</title></head>"
            f"<body>{text}{''.join(imgs)}</body></html>")
    return _Page(url, html.encode(charset), pairs)


def http_response(body: bytes, headers: list[tuple[str, str]], eol: bytes = b"\r\n",
                  status: bytes | None = b"HTTP/1.1 200 OK") -> bytes:
    lines = ([status] if status is not None else []) + [f"{k}: {v}".encode() for k, v in headers]
    return eol.join(lines) + eol + eol + body


def warc_record(rec_type: str, uri: str | None, block: bytes, version: str = "1.0",
                eol: bytes = b"\r\n", date: str = "2024-05-18T10:00:00Z",
                content_type: str | None = None, length: int | None = None,
                extra: list[tuple[str, str]] = ()) -> bytes:
    headers = [("WARC-Type", rec_type), ("WARC-Record-ID", f"<urn:uuid:{uuid.uuid4()}>"),
               ("WARC-Date", date)]
    if uri is not None:
        headers.append(("WARC-Target-URI", uri))
    if content_type is None:
        content_type = {"response": "application/http; msgtype=response",
                        "request": "application/http; msgtype=request"}.get(rec_type,
                                                                              "application/warc-fields")
    headers += [("Content-Type", content_type), *extra,
                ("Content-Length", str(len(block) if length is None else length))]
    head = f"WARC/{version}".encode() + eol + eol.join(f"{k}: {v}".encode() for k, v in headers)
    return head + eol + eol + block + b"\r\n\r\n"


def warcinfo(version: str = "1.0", eol: bytes = b"\r\n") -> bytes:
    return warc_record("warcinfo", None, b"software: clipcrawl tests/gen/warc_quirks.py\r\n",
                       version, eol)


def request(uri: str, version: str = "1.0", eol: bytes = b"\r\n") -> bytes:
    host = uri.split("/")[2]
    return warc_record("request", uri, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), version, eol)


def write(path: Path, records: list[bytes], gz: bool) -> Path:
    """One gzip member per record (the WARC convention), or uncompressed."""
    path.write_bytes(b"".join(gzip.compress(r) for r in records) if gz else b"".join(records))
    return path


def _ct(charset: str | None = "utf-8") -> tuple[str, str]:
    return ("Content-Type", "text/html" + (f"; charset={charset}" if charset else ""))


def chunk(body: bytes, size: int = 50) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


ALTS_EN = ["A red bicycle on a wall", "Sunset over the harbour", "Logo of the company"]
ALTS_JA = ["東京の夜景と高層ビル", "富士山の朝の風景", "京都の古いお寺の庭"]
ALTS_ZH = ["长城上的日出景色", "一碗热腾腾的拉面"]
ALTS_TW = ["台北的夜市小吃", "阿里山的日出雲海"]
ALTS_RU = ["Красная площадь зимой", "Кот сидит на подоконнике"]


def quirk_files(folder: str | Path) -> dict[str, QuirkFile]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, QuirkFile] = {}

    # Transfer-Encoding: chunked over a de-chunked body (pywb / warcprox), CRLF and bare LF
    p1, p2 = page(1, ALTS_EN), page(2, ALTS_EN[:2])
    recs = [warcinfo(),
            warc_record("response", p1.url, http_response(p1.html, [_ct(), ("Transfer-Encoding", "chunked")])),
            request(p1.url),
            warc_record("response", p2.url, http_response(p2.html, [_ct(), ("Transfer-Encoding", "chunked")],
                                                          eol=b"\n"))]
    out["chunked_raw"] = QuirkFile(str(write(folder / "chunked-raw.warc", recs, gz=False)),
                                   p1.pairs + p2.pairs, 4, quirks={"te_chunked_raw": 2})

    # really chunked, and really gzip-encoded + chunked
    p3, p4 = page(3, ALTS_EN), page(4, ALTS_EN[1:])
    recs = [warcinfo(),
            warc_record("response", p3.url, http_response(chunk(p3.html), [_ct(), ("Transfer-Encoding", "chunked")])),
            warc_record("response", p4.url, http_response(chunk(gzip.compress(p4.html)), [
                _ct(), ("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]))]
    out["chunked_real"] = QuirkFile(str(write(folder / "chunked-real.warc.gz", recs, gz=True)),
                                    p3.pairs + p4.pairs, 3,
                                    quirks={"te_chunked_decoded": 2, "ce_gzip_decoded": 1})

    # Content-Encoding: gzip over a plain body (and one deflate over a plain body)
    p5, p6 = page(5, ALTS_EN), page(6, ALTS_EN[:1])
    recs = [warcinfo(),
            warc_record("response", p5.url, http_response(p5.html, [_ct(), ("Content-Encoding", "gzip")])),
            warc_record("response", p6.url, http_response(p6.html, [_ct(), ("Content-Encoding", "deflate")]))]
    out["ce_mismatch"] = QuirkFile(str(write(folder / "ce-mismatch.warc", recs, gz=False)),
                                   p5.pairs + p6.pairs, 3,
                                   quirks={"ce_gzip_raw": 1, "ce_deflate_raw": 1})

    # ClueWeb09-like: WARC/0.18, bare LF everywhere, invalid WARC-Date, EUC-JP, CE gzip over plain
    p7 = page(7, ALTS_JA, "euc-jp", declare="meta")
    p8 = page(8, ALTS_JA[1:], "euc-jp", declare=None)
    p9 = page(9, ALTS_EN)
    lf = b"\n"
    recs = [warcinfo("0.18", lf),
            warc_record("response", p7.url, http_response(p7.html, [("Content-Type", "text/html")], eol=lf),
                        "0.18", lf, date="2009-01-13T19:06:40-0800"),
            warc_record("response", p8.url, http_response(p8.html, [("Content-Type", "text/html"),
                                                                    ("Content-Encoding", "gzip")], eol=lf),
                        "0.18", lf, date="2009-13-45T99:99:99Z"),
            warc_record("response", p9.url, http_response(p9.html, [_ct("utf-8")], eol=lf), "0.18", lf)]
    out["clueweb"] = QuirkFile(str(write(folder / "clueweb-like.warc.gz", recs, gz=True)),
                               p7.pairs + p8.pairs + p9.pairs, 4,
                               quirks={"bare_lf_headers": 4, "bare_lf_http_headers": 3, "ce_gzip_raw": 1},
                               bad_dates=2, charset_detected=1)

    # legacy charsets: declared in <meta>, in the HTTP header, and undeclared (detection)
    cases = [(page(10, ALTS_JA, "shift_jis", "meta"), None),
             (page(11, ALTS_JA, "shift_jis", None), None),
             (page(12, ALTS_ZH, "gb18030", None), None),
             (page(13, ALTS_TW, "big5", None), "big5"),
             (page(14, ALTS_RU, "windows-1251", None), None),
             (page(15, ALTS_RU, "koi8-r", None), "koi8-r"),
             (page(16, ALTS_JA, "euc-jp", None), None)]
    recs = [warcinfo()] + [warc_record("response", pg.url, http_response(pg.html, [_ct(cs)]))
                           for pg, cs in cases]
    out["charsets"] = QuirkFile(str(write(folder / "charsets.warc.gz", recs, gz=True)),
                                [x for pg, _ in cases for x in pg.pairs], 8, charset_detected=4)

    # Content-Length that lies, in the middle of a file: too long (eats into the next record),
    # too short (ends inside the body). The pages around them must be read.
    pages = [page(20 + i, ALTS_EN[: 1 + i % 3]) for i in range(5)]
    blocks = [http_response(pg.html, [_ct()]) for pg in pages]
    recs = [warcinfo()]
    for i, (pg, block) in enumerate(zip(pages, blocks)):
        length = {1: len(block) + 300, 3: len(block) - 40}.get(i)
        recs.append(warc_record("response", pg.url, block, length=length))
    pairs = [x for pg in pages for x in pg.pairs]
    for gz, name in ((True, "lying-length.warc.gz"), (False, "lying-length.warc")):
        out["lying_length" + ("_gz" if gz else "")] = QuirkFile(
            str(write(folder / name, recs, gz=gz)), pairs, 6, quirks={"content_length_mismatch": 2})

    # garbage between records and a corrupt gzip member: the records around them are read
    pages = [page(30 + i, ALTS_EN[:2]) for i in range(4)]
    members = [gzip.compress(warcinfo())] + [
        gzip.compress(warc_record("response", pg.url, http_response(pg.html, [_ct()]))) for pg in pages]
    bad = bytearray(members[2])
    bad[20:60] = b"\x00" * 40                          # corrupt deflate data of page 31's member
    data = members[0] + members[1] + bytes(bad) + b"junk between members" + members[3] + members[4]
    (folder / "garbage.warc.gz").write_bytes(data)
    out["garbage_gz"] = QuirkFile(str(folder / "garbage.warc.gz"),
                                  pages[0].pairs + pages[2].pairs + pages[3].pairs, 4,
                                  status="partial", lost=1)
    recs = [warcinfo(), warc_record("response", pages[0].url, http_response(pages[0].html, [_ct()])),
            b"some bytes that are not a record\r\n\r\n",
            warc_record("response", pages[1].url, http_response(pages[1].html, [_ct()]))]
    out["garbage_plain"] = QuirkFile(str(write(folder / "garbage.warc", recs, gz=False)),
                                     pages[0].pairs + pages[1].pairs, 3, status="partial", lost=1)

    # truncated last gzip member: the records before it are kept
    pages = [page(40 + i, ALTS_EN, filler=8000) for i in range(3)]
    members = [gzip.compress(warcinfo())] + [
        gzip.compress(warc_record("response", pg.url, http_response(pg.html, [_ct()]))) for pg in pages]
    (folder / "truncated.warc.gz").write_bytes(b"".join(members)[: -len(members[-1]) // 2])
    out["truncated"] = QuirkFile(str(folder / "truncated.warc.gz"), pages[0].pairs + pages[1].pairs,
                                 4, status="partial")

    # ARC v1 (Common Crawl 2008-2012, Internet Archive): plain and one gzip member per record
    pages = [page(50 + i, ALTS_EN[i:]) for i in range(3)]
    arc = _arc_records(pages)
    out["arc"] = QuirkFile(str(write(folder / "crawl.arc", arc, gz=False)),
                           [x for pg in pages for x in pg.pairs], 5)
    out["arc_gz"] = QuirkFile(str(write(folder / "crawl.arc.gz", arc, gz=True)),
                              [x for pg in pages for x in pg.pairs], 5)

    # WARC/1.1: fractional-second dates, revisit, resource and conversion records beside responses
    p70, p71 = page(70, ALTS_EN), page(71, ALTS_EN[1:])
    v = "1.1"
    recs = [warcinfo(v),
            warc_record("response", p70.url, http_response(p70.html, [_ct()]), v,
                        date="2024-05-18T10:00:00.123456Z"),
            warc_record("revisit", p70.url, b"", v, content_type="application/http; msgtype=response",
                        extra=[("WARC-Profile", "http://netpreserve.org/warc/1.1/revisit/identical-payload-digest")]),
            warc_record("resource", "file:///crawl.log", b"crawl log line\n", v, content_type="text/plain"),
            warc_record("conversion", p70.url, b"converted text", v, content_type="text/plain"),
            warc_record("response", p71.url, http_response(p71.html, [_ct()]), v)]
    out["warc11"] = QuirkFile(str(write(folder / "warc11.warc.gz", recs, gz=True)),
                              p70.pairs + p71.pairs, 6)

    # no status line / no HTTP header at all
    p60, p61 = page(60, ALTS_EN), page(61, ALTS_EN[:2])
    recs = [warcinfo(),
            warc_record("response", p60.url, http_response(p60.html, [_ct()], status=None)),
            warc_record("response", p61.url, p61.html)]
    out["no_status_line"] = QuirkFile(str(write(folder / "no-status.warc", recs, gz=False)),
                                      p60.pairs + p61.pairs, 3,
                                      quirks={"http_status_line_missing": 1, "http_headers_missing": 1})
    return out


def _arc_records(pages: list[_Page]) -> list[bytes]:
    """filedesc record, a dns: record, then one record per page (ARC v1: URL IP DATE MIME LENGTH)."""
    desc = (b"1 0 clipcrawl\nURL IP-address Archive-date Content-type Archive-length\n")
    recs = [b"filedesc://crawl.arc 0.0.0.0 20080430204825 text/plain %d\n%s\n" % (len(desc), desc)]
    dns = b"20080430204825\nwww.example.org.\t589\tIN\tA\t192.0.2.1\n"
    recs.append(b"dns:www.example.org 192.0.2.1 20080430204825 text/dns %d\n%s\n" % (len(dns), dns))
    for pg in pages:
        block = http_response(pg.html, [_ct()])
        recs.append(b"%s 192.0.2.1 20080430204826 text/html %d\n%s\n" % (pg.url.encode(), len(block), block))
    return recs
