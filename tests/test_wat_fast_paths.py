"""The fast paths of the WAT parser give exactly the rows of the plain path (issue 17).

`udfs.extract.wat` has two shortcuts: a typed msgspec decode of the JSON payload (`_wat_links_typed`)
and, per link, an inlined URL/alt-text case. Here both are checked against paths without any
shortcut: `wat_links_untyped` (orjson + dict walk) for each payload, and `reference_rows`, which
reads records with warcio and judges every link with `LinkRules.judge` over the slow
`urls.resolve_and_normalize`, for every Pair and link-level Rejected row of a file. bench/bench_wat.py
runs `reference_rows` over its 100 MB file too.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import orjson
import pytest

from tests.gen import wat_writer as ww
from udfs import ids
from udfs.extract import urls, warc_records, wat

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
WAT_FIXTURES = sorted(p for p in SHARED.glob("*/*") if ".wat" in p.name)


class _SlowResolver:
    """Resolver without fast paths: every link through resolve_and_normalize."""

    def __init__(self, page_url, base_href, schemes):
        self.args = (page_url, base_href, schemes)

    def absolute(self, raw):
        page_url, base_href, schemes = self.args
        return urls.resolve_and_normalize(raw, page_url, base_href, schemes)


def reference_rows(path, rules: wat.LinkRules | None = None) -> list[tuple]:
    """Pairs and link-level rejects of a well-formed WAT file, the plain way (no fast path)."""
    from warcio.archiveiterator import ArchiveIterator

    rules = rules or wat.LinkRules()
    rows = []
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh, arc2warc=True):
            if rec.rec_type != "metadata":
                continue
            headers = rec.rec_headers
            found = wat.wat_links_untyped(rec.content_stream().read())
            if found.status == "missing_fields" and found.page_url is None and found.links:
                target = headers.get_header("WARC-Target-URI")
                if target:
                    found = found._replace(status="links", page_url=target)
            if found.status not in ("links", "missing_fields") or not found.links:
                continue
            page_url = found.page_url
            if page_url and page_url[0] == "<":
                page_url, _ = warc_records.clean_uri(page_url)
            record_id = headers.get_header("WARC-Record-ID")
            date = headers.get_header("WARC-Date")
            if date is not None and not warc_records.valid_date(date):
                date = None
            resolver = _SlowResolver(page_url, found.base_href, rules.schemes)
            for raw_url, raw_alt in found.links:
                url, text, truncated, status, message = rules.judge(resolver, raw_url, raw_alt,
                                                                    rules.unescape_alt)
                if status is None:
                    rows.append(("pair", ids.pair_uid(url, text), url, text, page_url, record_id,
                                 date, truncated, found.page_opt_out))
                else:
                    rows.append(("reject", url, text, page_url, record_id, status, message))
    return rows


def our_rows(path, reader: str = "fastwarc", rules: wat.LinkRules | None = None) -> list[tuple]:
    opts = wat.ExtractOptions(reader=reader, rules=rules or wat.LinkRules())
    rows = []
    for r in wat.extract_file(str(path), opts):
        if isinstance(r, wat.Pair):
            rows.append(("pair", r.uid, r.url, r.text, r.page_url, r.record_id, r.record_date,
                         r.alt_truncated, r.page_opt_out))
        elif isinstance(r, wat.Rejected) and r.level == "link":
            rows.append(("reject", r.url, r.text, r.page_url, r.record_id, r.status,
                         r.error_message))
    return rows


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> list[Path]:
    """Pages with every bad-link kind and relative URL form, the record-level bad cases, and
    <base href> pages, in a file of its own (the bench's generator, smaller)."""
    folder = tmp_path_factory.mktemp("wat_fast")
    a = folder / "CC-MAIN-2024-22-links.warc.wat.gz"
    ww.write_wat(a, ww.random_pages(150, seed=11, bad_link_rate=0.3, n_anchor_links=20), seed=11)
    b = folder / "CC-MAIN-2024-22-records.warc.wat.gz"
    odd = ww.RawRecord(orjson.dumps(_doc([{"path": "IMG@/src", "url": u, "alt": "Alt text here"}
                                          for u in ODD_URLS])), "https://www.example.org/p.html")
    ww.write_wat(b, ww.random_pages(5, seed=12, bad_link_rate=0.5) + ww.bad_records() + [odd],
                 seed=12)
    return [a, b]


# URLs next to the cases the inlined URL path takes (absolute, canonical, with a path)
ODD_URLS = ["https://img.example.com", "https://img.example.com?x=1", "https://img.example.com/",
            "HTTPS://Img.Example.com/a.png", "https://img.example.com/./a.png",
            "https://img.example.com/a/../b.png", "https://img.example.com:443/a.png",
            "https://img.example.com:8080/a.png", "http://img.example.com/a b.png",
            "https://img.example.com/a.png#frag", "https://img.example.com/a.png?q=/.x",
            "//cdn.example.com", "//cdn.example.com/a.png", "https://m\u00fcnchen.example/a.png",
            "https://user:pw@img.example.com/a.png", "https://img.example.com/%7Ea.png",
            "https://img.example.com/a.png?x=%zz", " https://img.example.com/a.png",
            "https:/img.example.com/a.png", "https://[::1]/a.png", "http://", "a.png", "../a.png"]


def test_generated_files_give_the_rows_of_the_plain_path(generated):
    for path in generated:
        expected = reference_rows(path)
        assert len(expected) > 10
        for reader in ("fastwarc", "warcio"):
            assert our_rows(path, reader) == expected, (path.name, reader)


def test_rules_other_than_the_default_give_the_rows_of_the_plain_path(generated):
    """Other alt lengths and an https-only scheme list (where the URL fast paths must not
    keep http URLs)."""
    for rules in (wat.LinkRules(min_alt_length=12, max_alt_length=40),
                  wat.LinkRules(schemes=("https",))):
        expected = reference_rows(generated[0], rules)
        assert our_rows(generated[0], rules=rules) == expected, rules
    kinds = {row[5] for row in reference_rows(generated[0], wat.LinkRules(schemes=("https",)))
             if row[0] == "reject"}
    assert "not_http" in kinds


@pytest.mark.skipif(not WAT_FIXTURES, reason="../shared/fixtures not present")
def test_real_wat_fixtures_give_the_rows_of_the_plain_path():
    for path in WAT_FIXTURES:
        assert our_rows(path) == reference_rows(path), path.name


def _payloads(path: Path) -> list[bytes]:
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as fh:
        return [rec.content_stream().read() for rec in ArchiveIterator(fh)
                if rec.rec_type == "metadata"]


def _doc(links, head=None, uri="https://www.example.org/page.html") -> dict:
    html = {"Links": links} if head is None else {"Links": links, "Head": head}
    return {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": uri},
                         "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": html}}}}


IMG = {"path": "IMG@/src", "url": "/a.png", "alt": "A picture of a cat"}
ODD_PAYLOADS = [
    orjson.dumps(_doc([IMG, {"path": "A@/href", "url": "/x", "text": "x"}])),
    orjson.dumps(_doc([IMG, {"path": "__base__", "url": "https://cdn.example.org/"},
                       {"path": "__base__", "url": "https://other.example.org/"}])),
    orjson.dumps(_doc([{"path": "IMG@/src", "url": 12, "alt": 3.5}, {"path": "IMG@/src"}])),
    orjson.dumps(_doc([IMG, {"path": "IMG@/src", "url": "/b.png", "alt": ["x"]}])),
    b'{"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": ['
    b'{"path": "IMG@/src", "url": 123456789012345678901234567890, "alt": 1e308}]}}}}}',
    b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": 123456789012345678901234567890}, '
    b'"Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": []}}}}}',
    orjson.dumps(_doc([IMG, 7, "text", None])),                     # links that are not objects
    orjson.dumps(_doc([IMG, {"path": ["IMG@/src"]}, {"path": 5}])),  # paths that are not strings
    orjson.dumps(_doc({"path": "IMG@/src"})),                       # Links not a list
    orjson.dumps(_doc(None)),
    orjson.dumps(_doc([IMG], head={"Metas": [{"name": "robots", "content": "noai"}]})),
    orjson.dumps(_doc([IMG], head={"Metas": "robots"})),
    orjson.dumps(_doc([IMG], head="not an object")),
    orjson.dumps(_doc([IMG], uri=None)),
    orjson.dumps(_doc([IMG], uri=17)),
    orjson.dumps(_doc([])),
    orjson.dumps({"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": None}}}}),
    orjson.dumps({"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": "text"}}}),
    orjson.dumps({"Envelope": {"WARC-Header-Metadata": ["x"], "Payload-Metadata": {}}}),
    orjson.dumps({"Envelope": "x"}), orjson.dumps({"other": 1}), orjson.dumps([1, 2]),
    b'{"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": '
    b'{"Links": [{"path": "A@/href", "path": "IMG@/src", "url": "/d.png", "alt": "Dup keys here"}]}}}}}',
    json.dumps(_doc([{"path": "IMG@/src", "url": "/caf\u00e9.png", "alt": "Caf\u00e9 au lait"}]),
               ensure_ascii=False).encode(),                        # UTF-8, not ASCII
    orjson.dumps(_doc([IMG])).replace(b"A picture", b"A pi\xe9ture"),  # Latin-1 byte in a value
    orjson.dumps(_doc([IMG, {"path": "A@/href", "url": "/x", "text": "caf\xe9"}])).replace(
        b"caf\xc3\xa9", b"caf\xe9"),                                # ... in a value not read
    b'{"Envelope": {"x": "\\ud800"}}',                             # lone surrogate escape
    b'{"Envelope": {"x": ' + b"[" * 1100 + b"]" * 1100 + b"}}",     # deeper than either limit
    b'{"Envelope": {"x": ' + b"[" * 600 + b"]" * 600 + b"}}",
    b'{"Envelope": {}} trailing', b"", b"not json", b'{"Envelope": {"x": NaN}}',
]


def test_typed_decode_equals_the_orjson_path_on_every_payload(generated):
    payloads = ODD_PAYLOADS + [p for path in generated + WAT_FIXTURES for p in _payloads(path)]
    typed = 0
    for payload in payloads:
        assert wat.wat_links(payload) == wat.wat_links_untyped(payload), payload[:300]
        assert wat.wat_links(payload, "https://t.example/") == \
            wat.wat_links_untyped(payload, "https://t.example/"), payload[:300]
        typed += wat._wat_links_typed(payload, None) is not None
    # the typed path is the one taken for ordinary payloads, not a path never used
    assert typed > len(payloads) // 2


def test_typed_decode_reads_fields_it_does_not_keep_in_full():
    """A payload invalid only in a part the typed decoder skips is still invalid_json."""
    for payload in (orjson.dumps(_doc([IMG])).replace(b'"HTML-Metadata"', b'"x": [1,}, "HTML-Metadata"'),
                    b'{"Envelope": {"x": "\\q"}}'):
        assert wat.wat_links(payload).status == "invalid_json"


def test_gzip_payload_stays_gzip(tmp_path):
    """A record whose payload is not JSON at all is one rejected row, also on the fast path."""
    p = tmp_path / "g.warc.wat.gz"
    bad = ww.RawRecord(gzip.compress(b"{}"), "https://www.example.org/g", "invalid_json", [])
    ww.write_wat(p, ww.random_pages(2, seed=3) + [bad], seed=3)
    rows = list(wat.extract_file(str(p), wat.ExtractOptions()))
    rejected = [r for r in rows if isinstance(r, wat.Rejected) and r.level == "record"]
    assert [r.status for r in rejected] == ["invalid_json"]
    assert rows[-1].records_rejected == 1
