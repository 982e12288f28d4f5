"""Each quirk of real archives that the real fixtures do not show, on a synthetic file written
byte for byte by tests/gen/warc_quirks.py (expected pairs declared by construction)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.gen import warc_quirks as wq
from udfs.extract import wat

READERS = ("fastwarc", "tolerant")


@pytest.fixture(scope="module")
def quirk_files(tmp_path_factory):
    return wq.quirk_files(tmp_path_factory.mktemp("warc_quirks"))


def run(path, reader, fmt="warc"):
    rows = list(wat.extract_file(path, wat.ExtractOptions(fmt=fmt, reader=reader)))
    return rows[-1], [(r.url, r.text) for r in rows if isinstance(r, wat.Pair)], rows


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["chunked_raw", "chunked_real", "ce_mismatch", "clueweb", "charsets",
                                  "lying_length", "lying_length_gz", "garbage_gz", "garbage_plain",
                                  "truncated", "arc", "arc_gz", "no_status_line", "warc11"])
def test_quirk_file(quirk_files, name, reader):
    case = quirk_files[name]
    out, pairs, rows = run(case.path, reader)
    assert out.status == case.status, (out.status, out.error_message)
    assert Counter(pairs) == Counter(case.pairs), (set(case.pairs) - set(pairs), set(pairs) - set(case.pairs))
    assert out.records_read == case.records, out.records_by_type
    assert out.records_lost == case.lost, out.lost_reasons
    for quirk, n in case.quirks.items():
        assert out.quirks.get(quirk, 0) >= n, (quirk, out.quirks)
    assert out.records_bad_date == case.bad_dates
    assert out.records_charset_detected == case.charset_detected
    assert not [r for r in rows if isinstance(r, wat.Rejected) and r.status == "bad_url"]
    if case.status == "partial":
        assert out.error_message and str(case.lost) in out.error_message
    lost_rows = Counter(r.status for r in rows if isinstance(r, wat.Rejected) and r.level == "record"
                        and r.record_id is None and r.page_url is None)
    assert lost_rows == Counter(out.lost_reasons) - Counter(), (lost_rows, out.lost_reasons)
    assert out.links_seen == out.pairs_kept + out.pairs_rejected


def test_bad_dates_are_null_and_pages_keep_their_pairs(quirk_files):
    out, pairs, rows = run(quirk_files["clueweb"].path, "fastwarc")
    dates = {r.page_url: r.record_date for r in rows if isinstance(r, wat.Pair)}
    assert dates["https://www.example.org/dir/page7.html"] is None
    assert dates["https://www.example.org/dir/page8.html"] is None
    assert dates["https://www.example.org/dir/page9.html"] == "2024-05-18T10:00:00Z"
    assert out.records_by_type == {"warcinfo": 1, "response": 3}


def test_warc_1_1_record_types_are_told_apart(quirk_files):
    out, pairs, rows = run(quirk_files["warc11"].path, "fastwarc")
    assert out.records_by_type == {"warcinfo": 1, "response": 2, "revisit": 1, "resource": 1,
                                   "conversion": 1}
    dates = {r.record_date for r in rows if isinstance(r, wat.Pair)}
    assert dates == {"2024-05-18T10:00:00.123456Z", "2024-05-18T10:00:00Z"}
    assert out.records_bad_date == 0


def test_arc_records_get_warc_style_fields(quirk_files):
    out, pairs, rows = run(quirk_files["arc_gz"].path, "fastwarc")
    assert out.archive_format == "arc" and out.records_by_type == {"warcinfo": 1, "response": 4}
    kept = [r for r in rows if isinstance(r, wat.Pair)]
    assert kept[0].record_date == "2008-04-30T20:48:26Z"
    assert kept[0].page_url == "https://www.example.org/dir/page50.html"
    assert out.records_not_html == 1      # the dns: record


def test_zstd_warc_when_zstandard_is_installed(tmp_path, quirk_files):
    zstandard = pytest.importorskip("zstandard")
    src = quirk_files["chunked_raw"]
    path = tmp_path / "x.warc.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(open(src.path, "rb").read()))
    out, pairs, _ = run(str(path), "fastwarc")
    assert out.status == "ok" and Counter(pairs) == Counter(src.pairs)


def test_corrupt_gzip_body_keeps_what_inflated():
    from udfs.extract import http_message

    html = b"<html><body>" + b"".join(b'<img src="/i%d.png" alt="Image number %d">' % (i, i)
                                       for i in range(2000)) + b"</body></html>"
    import gzip
    import random

    z = bytearray(gzip.compress(html))
    rng = random.Random(0)
    for i in range(len(z) - 200, len(z) - 100):      # corrupt near the end
        z[i] = rng.randrange(256)
    block = wq.http_response(bytes(z), [("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    resp = http_message.parse_response(block)
    assert "ce_gzip_decoded" in resp.quirks
    assert resp.body.startswith(b"<html><body><img") and 1000 < resp.body.count(b"<img") <= 2000


@pytest.mark.parametrize("reader", READERS)
def test_lying_content_length_in_a_wat(tmp_path, reader):
    """A plain WAT whose third record's Content-Length is 200 too long: every page is still read."""
    from tests.gen import wat_writer as ww

    s = ww.write_wat(tmp_path / "w.warc.wat", ww.random_pages(4, seed=5, bad_link_rate=0.0), gzip=False)
    data = bytearray(open(s.path, "rb").read())
    start, _ = s.response_offsets[1]
    i = data.index(b"Content-Length: ", start) + len(b"Content-Length: ")
    j = data.index(b"\r\n", i)
    data[i:j] = str(int(data[i:j]) + 200).encode()
    (tmp_path / "lying.warc.wat").write_bytes(bytes(data))
    out, pairs, _ = run(str(tmp_path / "lying.warc.wat"), reader, fmt="wat")
    assert out.status == "ok" and out.records_read == s.records
    assert pairs == s.pairs and out.quirks.get("content_length_mismatch") == 1


def test_zstd_warc_with_a_dictionary_frame(tmp_path, quirk_files):
    """The WARC-zstd layout: a skippable frame holding the dictionary, then one frame per record."""
    zstandard = pytest.importorskip("zstandard")
    src = quirk_files["charsets"]
    data = open(src.path, "rb").read()
    import gzip
    import re as _re

    plain = gzip.decompress(data)
    starts = [m.start() for m in _re.finditer(rb"WARC/1\.0\r\n", plain)] + [len(plain)]
    records = [plain[a:b] for a, b in zip(starts, starts[1:])]
    dictionary = zstandard.ZstdCompressionDict(b"".join(records)[:4000])
    cctx = zstandard.ZstdCompressor(dict_data=dictionary)
    raw_dict = dictionary.as_bytes()
    frame = b"\x5d\x2a\x4d\x18" + len(raw_dict).to_bytes(4, "little") + raw_dict
    path = tmp_path / "dict.warc.zst"
    path.write_bytes(frame + b"".join(cctx.compress(r) for r in records))
    out, pairs, _ = run(str(path), "fastwarc")
    assert out.status == "ok" and out.compression == "zstd" and out.records_read == src.records
    assert Counter(pairs) == Counter(src.pairs)


@pytest.mark.parametrize("reader", READERS)
def test_large_unwanted_records_are_streamed_past(tmp_path, reader):
    """A 48 MB resource record between two pages (plain and gzip, with a bare-LF page after it so
    the tolerant reader is the one that reads it): its bytes are never held, the pages are read."""
    import tracemalloc

    p1, p2 = wq.page(80, wq.ALTS_EN), wq.page(81, wq.ALTS_EN[:2])
    big = bytes(range(256)) * (48 << 12)
    recs = [wq.warcinfo(), wq.warc_record("response", p1.url, wq.http_response(p1.html, [wq._ct()])),
            wq.warc_record("resource", "https://www.example.org/video.mp4", big,
                           content_type="video/mp4"),
            wq.warc_record("response", p2.url, wq.http_response(p2.html, [wq._ct()], eol=b"\n"),
                           eol=b"\n")]
    for gz in (False, True):
        path = wq.write(tmp_path / f"big{int(gz)}.warc", recs, gz=gz)
        if reader == "tolerant":
            tracemalloc.start()
        out, pairs, _ = run(str(path), reader)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.status == "ok" and out.records_by_type == {"warcinfo": 1, "response": 2,
                                                              "resource": 1}
        assert Counter(pairs) == Counter(p1.pairs + p2.pairs)
        if reader == "tolerant":
            assert peak < len(big) * 0.5, peak      # the 48 MB block was never held whole


def test_http_layer_units():
    import gzip
    import zlib

    from udfs.extract import http_message as h

    html = b"<html><body>x</body></html>"
    stacked = h.parse_response(b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate, gzip\r\n\r\n"
                               + gzip.compress(zlib.compress(html)))
    assert stacked.body == html and stacked.quirks == ("ce_gzip_decoded", "ce_deflate_decoded")
    raw_deflate = zlib.compressobj(wbits=-15)
    raw = raw_deflate.compress(html) + raw_deflate.flush()
    assert h.parse_response(b"HTTP/1.0 200 OK\nContent-Encoding: deflate\n\n" + raw).body == html
    assert h.dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n") == b"hello world"
    assert h.dechunk(b"5;ext=1\nhello\n0\n\n") == b"hello"          # bare LF, chunk extension
    assert h.dechunk(b"<!doctype html>") is None
    assert h.dechunk(b"5\r\nhel") == b"hel"                         # cut inside a chunk
    garbled = h.parse_response(b"HTTP/1.1 OK\r\nContent-Type: text/html\r\n\r\n" + html)
    assert garbled.status is None and garbled.content_type == "text/html" and garbled.body == html
    assert h.parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").status == 404


def test_charset_order_header_bom_meta_detection():
    from udfs.extract import charsets

    page = "<html><head>{}</head><body>Fünf Brötchen für 2 €</body></html>"
    cp1252 = page.format('<meta charset="iso-8859-1">').encode("cp1252")
    d = charsets.decode_html(cp1252, "text/html")
    assert (d.codec, d.source, d.lossy) == ("cp1252", "meta", False) and "€" in d.text  # WHATWG
    utf8 = page.format('<meta charset="iso-8859-1">').encode("utf-8")
    # the header wins over the meta; a header charset that fits every byte is used
    assert charsets.decode_html(utf8, "text/html; charset=UTF-8").source == "header"
    # a declared charset that does not decode falls to the next declared one
    d = charsets.decode_html(cp1252, "text/html; charset=utf-8")
    assert (d.source, d.codec) == ("meta", "cp1252")
    bom = b"\xef\xbb\xbf" + page.format("").encode("utf-8")
    d = charsets.decode_html(bom, "text/html")
    assert d.source == "bom" and d.text.startswith("<html>")
    assert charsets.codec_for("GB2312") == "gb18030" and charsets.codec_for("x-sjis") == "cp932"
    assert charsets.codec_for("no-such-charset") is None
    jis = "<p>東京の夜景と高層ビル</p>".encode("iso2022_jp")
    assert charsets.decode_html(jis).codec == "iso2022_jp"
    assert charsets.decode_html(b"<p>plain ascii</p>").source == "utf8"


# --- damaged records: read, and also one rejected row each (issue 12) --------------------------------

def _bad_rows(rows):
    return [r for r in rows if isinstance(r, wat.Rejected) and r.status == "bad_record"]


def _rows_balance(out, rows):
    """Every rejected row is a link reject, a record rejected whole, a damaged record or a lost
    record: the outcome's counts add up to the rows written."""
    rejected = [r for r in rows if isinstance(r, wat.Rejected)]
    assert len(rejected) == (out.pairs_rejected + out.records_rejected + out.records_damaged
                             + out.records_lost)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["lying_length", "lying_length_gz"])
def test_lying_content_length_is_a_rejected_row(quirk_files, name, reader):
    """Records 2 and 4 (pages 21 and 23) of the file declare a wrong Content-Length: both are read
    by resync (their pairs kept) and each is one bad_record row naming the record."""
    case = quirk_files[name]
    out, pairs, rows = run(case.path, reader)
    assert out.status == "ok" and Counter(pairs) == Counter(case.pairs)
    bad = _bad_rows(rows)
    assert [r.page_url for r in bad] == ["https://www.example.org/dir/page21.html",
                                         "https://www.example.org/dir/page23.html"]
    assert all(r.level == "record" and r.record_id.startswith("<urn:uuid:") for r in bad)
    assert all(r.error_message.startswith("content_length_mismatch: Content-Length ") for r in bad)
    declared = [m.group(1) for m in (re.search(r"Content-Length (\d+)", r.error_message) for r in bad)]
    assert declared == [str(int(d)) for d in re.findall(
        rb"Content-Length: (\d+)", _plain_bytes(case.path))[2:5:2]]
    assert out.records_damaged == 2 and out.damage_reasons == {"content_length_mismatch": 2}
    _rows_balance(out, rows)


def _plain_bytes(path):
    import gzip

    data = open(path, "rb").read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_body_that_does_not_decode_is_a_rejected_row(tmp_path):
    """Content-Encoding gzip over: a body with the gzip magic that does not inflate (no text
    either), a gzip stream corrupt after a full flush (the part before it decodes), and a plain
    HTML body (the ClueWeb convention: a quirk, not damage)."""
    import random
    import zlib

    rng = random.Random(3)
    p90, p91a, p91b, p92 = (wq.page(90, wq.ALTS_EN), wq.page(91, wq.ALTS_EN[:2]),
                            wq.page(191, wq.ALTS_EN[2:]), wq.page(92, wq.ALTS_EN[1:]))
    garbage = b"\x1f\x8b\x08\x00" + bytes(rng.randrange(256) for _ in range(400))
    # page 91's images in the first half, flushed; the second half's deflate data corrupted
    half1 = p91a.html.replace(b"</body></html>", b"")
    half2 = b"<p>" + b"x" * 50 + b"</p>" + p91b.html.split(b"<body>")[1]
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = c.compress(half1) + c.flush(zlib.Z_FULL_FLUSH)
    second = bytearray(c.compress(half2) + c.flush())
    for i in range(2, len(second) - 8):
        second[i] = rng.randrange(256)
    ce = ("Content-Encoding", "gzip")
    recs = [wq.warcinfo(),
            wq.warc_record("response", p90.url, wq.http_response(garbage, [wq._ct(), ce])),
            wq.warc_record("response", p91a.url, wq.http_response(first + bytes(second), [wq._ct(), ce])),
            wq.warc_record("response", p92.url, wq.http_response(p92.html, [wq._ct(), ce]))]
    for gz in (False, True):
        path = wq.write(tmp_path / f"bad-body{int(gz)}.warc", recs, gz=gz)
        for reader in READERS:
            out, pairs, rows = run(str(path), reader)
            assert out.status == "ok" and out.records_read == 4
            assert Counter(pairs) == Counter(p91a.pairs + p92.pairs)
            bad = _bad_rows(rows)
            assert [(r.page_url, r.error_message.split(":")[0]) for r in bad] == [
                (p90.url, "ce_gzip_failed"), (p91a.url, "ce_gzip_corrupt")]
            assert out.quirks.get("ce_gzip_raw") == 1
            assert out.records_damaged == 2
            assert out.damage_reasons == {"ce_gzip_failed": 1, "ce_gzip_corrupt": 1}
            _rows_balance(out, rows)


def test_decode_failure_is_judged_on_documents_and_compressed_bodies():
    """A JPEG stored decoded under `Content-Encoding: gzip` is the archive convention (raw), not
    damage; a text/html body of binary bytes, or any body with the gzip magic that does not
    inflate, is damage (failed)."""
    from udfs.extract import http_message as h

    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)) * 4
    ce = [("Content-Encoding", "gzip")]
    img = h.parse_response(wq.http_response(jpeg, [("Content-Type", "image/jpeg"), *ce]))
    assert img.quirks == ("ce_gzip_raw",) and img.body == jpeg
    html_bin = h.parse_response(wq.http_response(jpeg, [("Content-Type", "text/html"), *ce]))
    assert html_bin.quirks == ("ce_gzip_failed",)
    bad_gzip = b"\x1f\x8b\x08\x00" + b"\x00" * 64
    assert h.parse_response(wq.http_response(bad_gzip, [("Content-Type", "image/png"), *ce])
                            ).quirks == ("ce_gzip_failed",)
    ja = "<p>東京の夜景</p>".encode("iso2022_jp")      # ESC bytes: still text
    assert h.parse_response(wq.http_response(ja, [("Content-Type", "text/html"), *ce])
                            ).quirks == ("ce_gzip_raw",)
