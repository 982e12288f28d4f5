"""The tolerant reader over files longer than its 1 MiB buffer window.

Regression: the buffer dropped consumed bytes while a record's indices were held, so a record
that started past 1 MiB was read at the wrong place and the rest of a valid file was lost without
any count. The expected records come from warcio (an independent reader) or, for ARC, from the
records the test wrote itself.
"""
import gzip
import io

import pytest
from warcio.archiveiterator import ArchiveIterator

from tests.gen import wat_writer as ww
from udfs.extract import warc_records as wr

ALL = frozenset({"warcinfo", "metadata", "response", "request", "resource"})


def _tolerant(path):
    log = wr.ReadLog()
    with open(path, "rb") as fh:
        recs = [(r.rec_type, r.headers.get("WARC-Target-URI"), r.block) for r in wr.read_records(fh, ALL, log)]
    return recs, log


def _warcio(path):
    with open(path, "rb") as fh:
        return [(r.rec_type, r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read())
                for r in ArchiveIterator(fh)]


@pytest.mark.parametrize("gz", [True, False])
def test_warc_past_the_buffer_window_reads_every_record(tmp_path, gz):
    path = tmp_path / ("big.wat.gz" if gz else "big.wat")
    ww.write_wat(path, ww.random_pages(450, seed=7, bad_link_rate=0.2, n_anchor_links=30), gzip=gz, seed=7)
    expected = _warcio(path)
    got, log = _tolerant(path)
    uncompressed = sum(len(b) for _, _, b in expected)
    assert uncompressed > 2 << 20            # the file spans the 1 MiB window at least twice
    assert [(t, u) for t, u, _ in got] == [(t, u) for t, u, _ in expected]
    assert [b for _, _, b in got] == [b for _, _, b in expected]
    assert log.lost == {} and log.quirks == {} and log.damage == []


def test_arc_past_the_buffer_window_reads_every_record(tmp_path):
    bodies = [(f"http://example.com/page{i}.html", (b"<html>" + bytes([65 + i % 26]) * (9000 + i) + b"</html>"))
              for i in range(300)]
    desc = b"1 0 clipcrawl\nURL IP-address Archive-date Content-type Archive-length\n"
    out = io.BytesIO()
    out.write(b"filedesc://big.arc 0.0.0.0 20240101000000 text/plain %d\n" % len(desc) + desc + b"\n")
    for url, body in bodies:
        out.write(f"{url} 127.0.0.1 20240101000000 text/html {len(body)}\n".encode() + body + b"\n")
    assert out.tell() > 2 << 20
    for name, data in (("big.arc", out.getvalue()), ("big.arc.gz", gzip.compress(out.getvalue()))):
        path = tmp_path / name
        path.write_bytes(data)
        got, log = _tolerant(path)
        responses = [(u, b) for t, u, b in got if t == "response"]
        assert responses == bodies, name
        assert log.lost == {} and log.damage == [], name
