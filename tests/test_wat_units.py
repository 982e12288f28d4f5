"""Unit tests of the WAT/WARC extraction functions (udfs/), without Spark."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter

import pytest

from tests.gen import wat_writer as ww
from udfs.extract import alt_text, urls, wat
from udfs.extract.warc_html import decode_html, html_links

READERS = wat.READERS
PAGE = "https://an.wikipedia.org/wiki/Escopete"

# The 13 <img> tags of the real page in tests/fixtures/commoncrawl/whirlwind.warc.gz, read by hand
# from its HTML (`zcat whirlwind.warc.gz | grep -o '<img[^>]*>'`), in document order:
# (normalised absolute URL, alt as extracted, expected status). Root-relative src values resolve
# against https://an.wikipedia.org, protocol-relative ones take https; `d&#39;armas` is an entity.
UPLOAD = "https://upload.wikimedia.org/wikipedia/commons/thumb"
WHIRLWIND_IMAGES = [
    ("https://an.wikipedia.org/static/images/icons/wikipedia.png", "", "empty_alt"),
    ("https://an.wikipedia.org/static/images/mobile/copyright/wikipedia-wordmark-an.svg",
     "Biquipedia", "keep"),
    ("https://an.wikipedia.org/static/images/mobile/copyright/wikipedia-tagline-an.svg",
     "A enciclopedia libre", "keep"),
    (f"{UPLOAD}/3/37/Translate_icon.svg/35px-Translate_icon.svg.png", None, "missing_alt"),
    (f"{UPLOAD}/0/0a/Escudo_de_Escopete_%28Guadalajara%29.svg/70px-Escudo_de_Escopete_%28Guadalajara%29.svg.png",
     "Escudo d'armas", "keep"),
    (f"{UPLOAD}/a/aa/Iglesia_de_Nuestra_Se%C3%B1ora_de_la_Asunci%C3%B3n._Escopete_%28Guadalajara%29.jpg/"
     "250px-Iglesia_de_Nuestra_Se%C3%B1ora_de_la_Asunci%C3%B3n._Escopete_%28Guadalajara%29.jpg",
     None, "missing_alt"),
    (f"{UPLOAD}/9/9a/Flag_of_Spain.svg/18px-Flag_of_Spain.svg.png", None, "missing_alt"),
    (f"{UPLOAD}/d/d4/Bandera_Castilla-La_Mancha.svg/18px-Bandera_Castilla-La_Mancha.svg.png", None,
     "missing_alt"),
    (f"{UPLOAD}/9/9c/Castilla-La_Mancha-loc.svg/250px-Castilla-La_Mancha-loc.svg.png",
     "Escopete ubicada en Castiella-La Mancha", "keep"),
    (f"{UPLOAD}/d/d2/Map_pointer.svg/12px-Map_pointer.svg.png", "Escopete", "keep"),
    ("https://login.wikimedia.org/wiki/Special:CentralAutoLogin/start?type=1x1", "", "empty_alt"),
    ("https://an.wikipedia.org/static/images/footer/wikimedia-button.png", "Wikimedia Foundation", "keep"),
    ("https://an.wikipedia.org/static/images/footer/poweredby_mediawiki_88x31.png",
     "Powered by MediaWiki", "keep"),
]


def rows_of(path, reader="fastwarc", fmt="wat", **rules):
    opts = wat.ExtractOptions(fmt=fmt, reader=reader, rules=wat.LinkRules(**rules))
    rows = list(wat.extract_file(str(path), opts))
    outcome = rows[-1]
    assert isinstance(outcome, wat.FileOutcome)
    pairs = [r for r in rows if isinstance(r, wat.Pair)]
    rejects = [r for r in rows if isinstance(r, wat.Rejected)]
    return pairs, rejects, outcome


# --- URLs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,base,expected", [
    ("x.png", None, "https://www.example.org/a/x.png"),
    ("/x.png", None, "https://www.example.org/x.png"),
    ("//cdn.example.com/x.png", None, "https://cdn.example.com/x.png"),
    ("img/x.png", "https://img.example.com/b/", "https://img.example.com/b/img/x.png"),
    ("x.png", "/other/", "https://www.example.org/other/x.png"),   # relative <base>
    ("../x.png", None, "https://www.example.org/x.png"),
    ("  \n/sp\nace.png\t", None, "https://www.example.org/space.png"),  # tab/newline removed inside
    ("/a b.png", None, "https://www.example.org/a%20b.png"),
    ("HTTP://WWW.Example.ORG:80/A.png#frag", None, "http://www.example.org/A.png"),
    ("https://h.example.com:8443/x?q=a b", None, "https://h.example.com:8443/x?q=a%20b"),
    ("/caf\u00e9.png", None, "https://www.example.org/caf%C3%A9.png"),
    ("http://m\u00fcnchen.de/x.png", None, "http://xn--mnchen-3ya.de/x.png"),
    ("https://h.example.com", None, "https://h.example.com/"),
])
def test_resolve_and_normalize(raw, base, expected):
    page = "https://www.example.org/a/page.html"
    assert urls.resolve_and_normalize(raw, page, base) == expected
    assert urls.Resolver(page, base).absolute(raw) == expected
    assert urls.normalize_url(expected) == expected  # idempotent


@pytest.mark.parametrize("raw,reason", [
    ("data:image/png;base64,iVBO", "not_http"), ("javascript:void(0)", "not_http"),
    ("ftp://files.example.com/a.png", "not_http"), ("mailto:a@b.c", "not_http"),
    ("http://[::1/x.png", "bad_url"), ("http://example.com:99999/a.png", "bad_url"),
    ("http:///nohost.png", "bad_url"), ("", "bad_url"), ("   ", "bad_url"), (None, "missing_url"),
])
def test_unusable_urls_get_a_reason(raw, reason):
    with pytest.raises(urls.UrlError) as err:
        urls.resolve_and_normalize(raw, "https://www.example.org/p.html")
    assert err.value.reason == reason
    with pytest.raises(urls.UrlError) as err:
        urls.Resolver("https://www.example.org/p.html").absolute(raw)
    assert err.value.reason == reason


def test_relative_url_without_page_is_bad():
    with pytest.raises(urls.UrlError) as err:
        urls.resolve_and_normalize("/x.png", None)
    assert err.value.reason == "bad_url"


def test_resolver_fast_paths_equal_slow_path():
    """The fast paths of Resolver must give exactly what resolve_and_normalize gives."""
    pages = ["https://www.example.org/a/b/page.html", "http://blog.example.net/", "https://ex.com",
             "https://Host.Example.com:443/x/y?q=1#f", "http://127.0.0.1:8000/pages/p.html",
             "https://ex.com?q", None]
    bases = [None, "https://img.example.com/base/", "/rel/base/", "//cdn.example.com/b/",
             "http://[::1/bad"]
    refs = ["x.png", "/x.png", "//cdn.example.com/x.png", "https://a.b/c d.png", "../up.png",
            "./here.png", "?q=1", "#frag", "", " /sp.png ", "data:x", "http://[::1/x",
            "http://e.com:99999/a", "HTTPS://UP.example.com/A.png", "http://e.com:80/a",
            "https://e.com", "https://e.com?x=1", "img/\u00e9.png", "http://ex.com/a/../b.png",
            "a/./b.png", "a/b/..", "..", ".", "http://user:pw@h.com/x", "https://h.com/x#frag",
            "x?y=1&z=2", "x:y.png", "/a//b.png", "https://h.com/a/..", "//h.com", "//h.com?x",
            "https://h.com/x?a=/./b", None]

    def outcome(fn, *args):
        try:
            return fn(*args)
        except urls.UrlError as exc:
            return ("error", exc.reason)

    checked = 0
    for page in pages:
        for base in bases:
            resolver = urls.Resolver(page, base)
            for ref in refs:
                slow = outcome(urls.resolve_and_normalize, ref, page, base)
                fast = outcome(resolver.absolute, ref)
                assert fast == slow, (page, base, ref)
                checked += 1
    assert checked == len(pages) * len(bases) * len(refs)


# --- alt-text ---------------------------------------------------------------------------------------

def test_alt_text_rules():
    assert alt_text.clean_alt("  A\u00a0red\n\tbike \u3000 ") == ("A red bike", None, False)
    assert alt_text.clean_alt(None).status == "missing_alt"
    assert alt_text.clean_alt(" \n ").status == "empty_alt"
    assert alt_text.clean_alt("abcd") == ("abcd", "alt_too_short", False)
    assert alt_text.clean_alt("abcde").status is None                 # exactly min length is kept
    assert alt_text.clean_alt("富士山の朝").status is None              # 5 code points
    assert alt_text.clean_alt("ab cd", min_length=6).status == "alt_too_short"
    long = alt_text.clean_alt("word " * 2000, max_length=100)
    assert long.truncated and long.status is None and len(long.text) <= 100
    assert long.text == ("word " * 20).strip()
    assert alt_text.clean_alt("Fish &amp; chips", unescape=True).text == "Fish & chips"
    assert alt_text.clean_alt("Fish &amp; chips", unescape=False).text == "Fish &amp; chips"


# --- gzip layer -------------------------------------------------------------------------------------

def _drain(stream: wat.GzipMembers) -> bytes:
    out = []
    while chunk := stream.read(7):
        out.append(chunk)
    return b"".join(out)


def test_gzip_members_reads_members_and_reports_truncation():
    parts = [b"WARC/1.0\r\nfirst member\r\n", b"second " * 1000, b"third"]
    data = b"".join(gzip.compress(p) for p in parts)
    g = wat.GzipMembers(io.BytesIO(data), chunk_size=64)
    assert _drain(g) == b"".join(parts) and g.members == 3 and not g.truncated
    cut = wat.GzipMembers(io.BytesIO(data[:-10]), chunk_size=64)
    assert _drain(cut).startswith(parts[0]) and cut.truncated
    with pytest.raises(wat.InputProblem) as err:
        _drain(wat.GzipMembers(io.BytesIO(data + b"garbage after the last member")))
    assert err.value.reason == "bad_gzip"
    plain = wat.GzipMembers(io.BytesIO(b"WARC/1.0\r\nplain"))
    assert not plain.gzip and _drain(plain) == b"WARC/1.0\r\nplain"
    with pytest.raises(wat.InputProblem) as err:
        wat.GzipMembers(io.BytesIO(b"<html>not a warc</html>"))
    assert err.value.reason == "not_warc"
    assert wat.GzipMembers(io.BytesIO(b"")).empty


# --- WAT records ------------------------------------------------------------------------------------

def _response(links, uri="https://www.example.org/a/p.html"):
    return {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": uri},
                         "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": links}}}}}


def test_wat_links_takes_img_links_and_base():
    doc = _response([{"path": "A@/href", "url": "/a"}, {"path": "__base__", "url": "https://cdn.example.com/"},
                     {"path": "IMG@/src", "url": "x.png", "alt": "An image"},
                     {"path": "IMG@/src", "url": "y.png"}, "not-a-dict", {"url": "/no-path.png"}])
    found = wat.wat_links(json.dumps(doc).encode())
    assert found.status == "links" and found.base_href == "https://cdn.example.com/"
    assert found.page_url == "https://www.example.org/a/p.html"
    assert found.links == [("x.png", "An image"), ("y.png", None)]


def test_wat_links_record_problems():
    assert wat.wat_links(b'{"Envelope": {').status == "invalid_json"
    assert wat.wat_links(b"").status == "invalid_json"
    assert wat.wat_links(b'{"Container": {}}').status == "missing_fields"
    assert wat.wat_links(b"[1, 2]").status == "missing_fields"
    bad_links = _response("nope")
    assert wat.wat_links(json.dumps(bad_links).encode()).status == "missing_fields"
    # no page URL anywhere: the links are reported with the record-level problem
    no_uri = {"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {
        "Links": [{"path": "IMG@/src", "url": "/x.png", "alt": "Some image"}]}}}}}
    found = wat.wat_links(json.dumps(no_uri).encode())
    assert found.status == "missing_fields" and found.links
    assert wat.wat_links(json.dumps(no_uri).encode(), "https://h.example.com/").status == "links"
    # non-UTF-8 bytes: decoded with U+FFFD and flagged
    latin1 = json.dumps(_response([{"path": "IMG@/src", "url": "/a.png", "alt": "Caf_ au lait"}]))
    found = wat.wat_links(latin1.encode().replace(b"Caf_", b"Caf\xe9"))
    assert found.status == "links" and found.non_utf8 and found.links[0][1] == "Caf\ufffd au lait"


def test_wat_links_skips_request_records_of_the_real_wat(commoncrawl_fixtures):
    from warcio.archiveiterator import ArchiveIterator

    with open(commoncrawl_fixtures / "whirlwind.warc.wat.gz", "rb") as fh:
        payloads = [r.content_stream().read() for r in ArchiveIterator(fh) if r.rec_type == "metadata"]
    assert len(payloads) == 1
    found = wat.wat_links(payloads[0])
    assert found.status == "not_html" and found.links == []


# --- whole files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return ww.bad_case_files(tmp_path_factory.mktemp("wat_bad"))


@pytest.mark.parametrize("reader", READERS)
def test_every_bad_case_is_counted(bad_files, reader):
    for name, case in bad_files.items():
        pairs, rejects, out = rows_of(case.path, reader)
        assert out.status == case.expect_status, name
        if case.expect_error:
            assert out.error_message.startswith(case.expect_error), (name, out.error_message)
        else:
            assert out.error_message is None, (name, out.error_message)
        link_rejects = Counter(r.status for r in rejects if r.level == "link")
        record_rejects = Counter(r.status for r in rejects if r.level == "record")
        assert out.links_seen == out.pairs_kept + out.pairs_rejected == len(pairs) + sum(link_rejects.values())
        if case.summary is None:
            assert not pairs and not rejects, name
            continue
        got = [(p.url, p.text) for p in pairs]
        if case.prefix_only:  # one gzip stream cut in the middle: what was read before is kept
            assert 0 < len(got) < len(case.summary.pairs) and got == case.summary.pairs[:len(got)]
            continue
        # pairs before a truncation point are kept, in order
        assert got == case.summary.pairs, name
        if name == "truncated":
            # the record cut by the truncation is read in part: its JSON is invalid
            assert record_rejects == Counter({"invalid_json": 1})
            continue
        assert link_rejects == case.summary.link_rejects, name
        assert record_rejects == case.summary.record_rejects, name
        assert out.records_read == case.summary.records and out.links_seen == case.summary.links
        assert out.records_non_utf8 == case.summary.non_utf8_records
        assert out.alt_truncated == case.summary.truncated_pairs
    mixed = bad_files["mixed"].summary
    assert set(mixed.link_rejects) >= {"missing_alt", "missing_url", "bad_url", "empty_alt", "alt_too_short"}
    assert mixed.truncated_pairs >= 1 and mixed.non_utf8_records == 1
    assert set(mixed.record_rejects) == {"invalid_json", "missing_fields"}


def test_pairs_carry_provenance(bad_files):
    pairs, rejects, _ = rows_of(bad_files["mixed"].path)
    p = pairs[0]
    assert p.crawl == "CC-MAIN-2024-22" and p.source_file == bad_files["mixed"].path
    assert p.record_id.startswith("<urn:uuid:") and p.record_date.startswith("2024-05-18T")
    assert p.page_url.startswith("http") and len(p.uid) == 16
    long = [q for q in pairs if q.alt_truncated]
    assert long and all(len(q.text) <= 4096 for q in long)
    reasons = {r.status: r.error_message for r in rejects}
    assert "99999" in reasons["bad_url"] or "IPv6" in reasons["bad_url"]


def test_readers_agree_on_a_realistic_file(tmp_path):
    pages = ww.random_pages(40, seed=7, bad_link_rate=0.2)
    summary = ww.write_wat(tmp_path / "CC-MAIN-2023-50-x.warc.wat.gz", pages)
    results = {r: rows_of(summary.path, r) for r in READERS}
    fast, slow = results["fastwarc"], results["warcio"]
    assert fast[0] == slow[0] and fast[1] == slow[1]
    assert [(p.url, p.text) for p in fast[0]] == summary.pairs
    assert Counter(r.status for r in fast[1]) == summary.link_rejects
    assert len({p.text for p in fast[0]}) > 10  # multilingual alt-texts survive intact
    assert any("\u6771\u4eac" in p.text for p in fast[0]) or any("\u0642\u0637\u0629" in p.text for p in fast[0])


def test_min_and_max_alt_length_are_configurable(bad_files):
    strict, _, out = rows_of(bad_files["mixed"].path, min_alt_length=30, max_alt_length=50)
    assert all(30 <= len(p.text) <= 50 for p in strict)
    assert out.alt_truncated > 1


@pytest.mark.parametrize("reader", READERS)
def test_real_warc_fixture_gives_the_hand_read_pairs(commoncrawl_fixtures, reader):
    pairs, rejects, out = rows_of(commoncrawl_fixtures / "whirlwind.warc.gz", reader, fmt="warc")
    assert out.status == "ok" and out.records_read == 4 and out.metadata_records == 1
    assert out.html_records == 1 and out.links_seen == 13
    assert [(p.url, p.text) for p in pairs] == [(u, t) for u, t, s in WHIRLWIND_IMAGES if s == "keep"]
    assert [(r.url, r.text, r.status) for r in rejects] == [i for i in WHIRLWIND_IMAGES if i[2] != "keep"]
    assert all(p.page_url == PAGE and p.crawl == "unknown" for p in pairs)


def test_warc_html_base_and_charset():
    html = ('<html><head><meta charset="iso-8859-1"><base href="https://cdn.example.com/i/"></head>'
            '<body><img src="a.png" alt="Caf\xe9 cr\xe8me &amp; co"><noscript><img src="/b.png" alt="In noscript">'
            '</noscript><IMG SRC="c.png"></body></html>').encode("latin-1")
    found = html_links(html, "https://www.example.org/p", "text/html")
    assert found.base_href == "https://cdn.example.com/i/"
    assert found.links == [("a.png", "Caf\u00e9 cr\u00e8me & co"), ("/b.png", "In noscript"), ("c.png", None)]
    assert html_links(b"<img src=x>", "https://e.org/", "image/png").status == "not_html"
    assert decode_html(b"\xff\xfe broken", "text/html; charset=utf-8") == ("\ufffd\ufffd broken", True)


def test_real_wat_fixture_has_nothing_to_take(commoncrawl_fixtures):
    for reader in READERS:
        pairs, rejects, out = rows_of(commoncrawl_fixtures / "whirlwind.warc.wat.gz", reader)
        assert out.status == "ok" and (out.records_read, out.metadata_records, out.html_records) == (2, 1, 0)
        assert not pairs and not rejects


# --- paths lists and remote files -------------------------------------------------------------------

def test_paths_list_plain_and_gzip(tmp_path):
    entries = ["# a comment", "crawl-data/CC-MAIN-2024-22/segments/1/wat/a.warc.wat.gz", "",
               "/abs/local.wat.gz", "s3://other/b.wat.gz", "https://h.example.com/c.wat.gz"]
    expected = ["https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-22/segments/1/wat/a.warc.wat.gz",
                "/abs/local.wat.gz", "s3://other/b.wat.gz", "https://h.example.com/c.wat.gz"]
    for gz in (False, True):
        path = ww.write_paths_file(tmp_path / f"wat.paths{'.gz' if gz else ''}", entries, gzip=gz)
        assert wat.read_paths_list(str(path), "https://data.commoncrawl.org/") == expected
    assert wat.crawl_of(expected[0]) == "CC-MAIN-2024-22" and wat.crawl_of("/x/y.wat.gz") == "unknown"


@pytest.fixture(scope="module")
def s3(moto_s3):
    moto_s3.bucket("commoncrawl-test")
    return {"client": moto_s3.client, "endpoint": moto_s3.endpoint, "options": moto_s3.options}

def test_s3_files_and_paths_list(s3, bad_files, tmp_path):
    client, options = s3["client"], s3["options"]
    prefix = "crawl-data/CC-MAIN-2024-22/segments/1/wat/"
    for name in ("mixed", "truncated"):
        with open(bad_files[name].path, "rb") as fh:
            client.put_object(Bucket="commoncrawl-test", Key=prefix + name + ".warc.wat.gz", Body=fh.read())
    paths = ww.write_paths_file(tmp_path / "wat.paths.gz", [prefix + "mixed.warc.wat.gz",
                                                            prefix + "truncated.warc.wat.gz",
                                                            prefix + "missing.warc.wat.gz"], gzip=True)
    client.put_object(Bucket="commoncrawl-test", Key="wat.paths.gz", Body=paths.read_bytes())
    listed = wat.read_paths_list("s3://commoncrawl-test/wat.paths.gz", "s3://commoncrawl-test/", options)
    assert listed == [f"s3://commoncrawl-test/{prefix}{n}.warc.wat.gz" for n in ("mixed", "truncated", "missing")]
    outcomes = {}
    for uri in listed:
        rows = list(wat.extract_file(uri, wat.ExtractOptions(), options))
        outcomes[uri.rsplit("/", 1)[1]] = (rows[-1], [(r.url, r.text) for r in rows if isinstance(r, wat.Pair)])
    assert outcomes["mixed.warc.wat.gz"][0].status == "ok"
    assert outcomes["mixed.warc.wat.gz"][1] == bad_files["mixed"].summary.pairs
    assert outcomes["truncated.warc.wat.gz"][0].status == "partial"
    assert outcomes["truncated.warc.wat.gz"][1] == bad_files["truncated"].summary.pairs
    assert outcomes["missing.warc.wat.gz"][0].status == "failed"
    assert outcomes["missing.warc.wat.gz"][0].error_message.startswith("file_not_found")


def test_https_style_urls_on_a_loopback_server(bad_files):
    """fsspec's http filesystem (the https://data.commoncrawl.org path), on 127.0.0.1."""
    pytest.importorskip("aiohttp")
    import functools
    import http.server
    import os
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = os.path.dirname(bad_files["mixed"].path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        for name in ("mixed", "truncated"):
            case = bad_files[name]
            rows = list(wat.extract_file(base + os.path.basename(case.path), wat.ExtractOptions()))
            assert rows[-1].status == case.expect_status
            assert [(r.url, r.text) for r in rows if isinstance(r, wat.Pair)] == case.summary.pairs
        missing = list(wat.extract_file(base + "nope.warc.wat.gz", wat.ExtractOptions()))
        assert missing[-1].status == "failed" and missing[-1].error_message.startswith("file_not_found")
    finally:
        server.shutdown()


class _DropsConnection(io.BytesIO):
    """A seekable stream that serves `limit` bytes of a real file, then fails like a reset connection."""

    def __init__(self, data: bytes, limit: int, error: BaseException):
        super().__init__(data)
        self._limit, self._error = limit, error

    def read(self, n=-1):
        left = self._limit - self.tell()
        if left <= 0:
            raise self._error
        return super().read(left if n is None or n < 0 else min(n, left))

    read1 = read

    def readinto(self, b):
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("reader", wat.READERS)
def test_network_errors_fail_the_task_for_a_retry_but_bad_bytes_are_counted(tmp_path, reader):
    """A reset connection is not bad input: it is raised so Spark retries the task (the file is read
    again), instead of the file ending `partial` for good. Truncated bytes stay a counted outcome."""
    summary = ww.write_wat(tmp_path / "f.warc.wat.gz", ww.random_pages(30, seed=5))
    data = (tmp_path / "f.warc.wat.gz").read_bytes()
    opts = wat.ExtractOptions(reader=reader, chunk_size=4096)
    stream = _DropsConnection(data, len(data) // 2, ConnectionResetError("reset by peer"))
    with pytest.raises(ConnectionResetError):
        list(wat.extract_stream(stream, "f.warc.wat.gz", opts))
    assert wat.is_transient(TimeoutError()) and not wat.is_transient(ValueError("bad gzip"))
    truncated = io.BytesIO(data[: len(data) // 2])
    outcome = list(wat.extract_stream(truncated, "f.warc.wat.gz", opts))[-1]
    assert outcome.status == "partial" and summary.pairs
