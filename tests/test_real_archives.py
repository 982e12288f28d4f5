"""Real web archives (../shared/fixtures/real-archives and commoncrawl): the stage's pairs against
an independent reading, and every record accounted for.

The reference reader is written here and shares no parsing code with the stage: records come from
warcio (its own gzip, header and HTTP parsing, de-chunking and Content-Encoding decoding), WAT
JSON from the standard library's json, and HTML from the standard library's html.parser. Only the
link rules (udfs.extract.urls.resolve_and_normalize, udfs.extract.alt_text.clean_alt) are shared, because they
define what a pair is. Expected record counts by type also come from the fixtures' README.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from udfs.extract import alt_text, urls, wat

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "real-archives"
CC = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "commoncrawl"
REAL_FILES = sorted(p for p in REAL.glob("*") if p.suffix != ".md") if REAL.exists() else []
CC_FILES = [CC / n for n in ("whirlwind.warc.gz", "whirlwind.warc.wat.gz")] if CC.exists() else []
ALL_FILES = REAL_FILES + CC_FILES


# --- the independent reader ---------------------------------------------------------------------------

class _ImgParser(HTMLParser):
    """<img src alt> and the first <base href> with the standard library's tokenizer."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs: list[tuple[str | None, str | None]] = []
        self.base: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            d = {}
            for k, v in attrs:           # the first of a repeated attribute wins, as in HTML5
                d.setdefault(k, v if v is not None else "")
            self.imgs.append((d.get("src"), d.get("alt")))
        elif tag == "base" and self.base is None:
            for k, v in attrs:
                if k == "href" and v is not None:
                    self.base = v
                    break

    handle_startendtag = handle_starttag


def _charset(content_type: str | None, body: bytes) -> str:
    m = re.search(r"charset=[\"']?([\w.:-]+)", content_type or "", re.I)
    if m is None:
        m = re.search(rb"<meta[^>]*charset=[\"']?([\w.:-]+)", body[:4096], re.I)
        label = m.group(1).decode() if m else "utf-8"
    else:
        label = m.group(1)
    try:
        "".encode(label)
        return label
    except LookupError:
        return "utf-8"


def _rules(page_url, base, links, unescape):
    """-> Counter of kept (url, text) and Counter of reject statuses, by the project's rules."""
    kept, rejected = Counter(), Counter()
    for src, alt in links:
        try:
            url = urls.resolve_and_normalize(src, page_url, base)
        except urls.UrlError as exc:
            rejected[exc.reason] += 1
            continue
        a = alt_text.clean_alt(alt, 5, 4096, unescape)
        if a.status is None:
            kept[(url, a.text)] += 1
        else:
            rejected[a.status] += 1
    return kept, rejected


def _unbracket(uri):
    uri = (uri or "").strip()
    return uri[1:-1] if uri.startswith("<") and uri.endswith(">") else (uri or None)


def reference(path: Path, fmt: str) -> dict:
    """Records by type, pairs and link rejects of one file by the independent reader."""
    from warcio.archiveiterator import ArchiveIterator

    types, kept, rejected = Counter(), Counter(), Counter()
    html_pages = 0
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh, arc2warc=True):
            types[rec.rec_type] += 1
            page = _unbracket(rec.rec_headers.get_header("WARC-Target-URI"))
            if fmt == "wat" and rec.rec_type == "metadata":
                try:
                    env = json.loads(rec.content_stream().read())["Envelope"]
                    html = env["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
                except (ValueError, KeyError, TypeError):
                    continue
                page = _unbracket(env.get("WARC-Header-Metadata", {}).get("WARC-Target-URI")) or page
                links = html.get("Links", [])
                base = next((lk["url"] for lk in links if lk.get("path") == "__base__"), None)
                imgs = [(lk.get("url"), lk.get("alt")) for lk in links if lk.get("path") == "IMG@/src"]
                unescape = True
            elif fmt == "warc" and rec.rec_type == "response" and rec.http_headers is not None:
                ctype = rec.http_headers.get_header("Content-Type") or ""
                if ctype.split(";")[0].strip().lower() not in ("text/html", "application/xhtml+xml"):
                    continue
                body = rec.content_stream().read()
                parser = _ImgParser()
                parser.feed(body.decode(_charset(ctype, body), "replace"))
                parser.close()
                base, imgs, unescape = parser.base, parser.imgs, False
            else:
                continue
            html_pages += 1
            k, r = _rules(page, base, imgs, unescape)
            kept += k
            rejected += r
    return {"types": types, "kept": kept, "rejected": rejected, "html": html_pages}


def stage(path: Path, fmt: str, reader: str = "fastwarc"):
    rows = list(wat.extract_file(str(path), wat.ExtractOptions(fmt=fmt, reader=reader)))
    out = rows[-1]
    kept = Counter((r.url, r.text) for r in rows if isinstance(r, wat.Pair))
    rejected = Counter(r.status for r in rows if isinstance(r, wat.Rejected) and r.level == "link")
    return out, kept, rejected, rows


def agreement(ours: Counter, ref: Counter) -> tuple[float, float]:
    """(share of the reference's pairs we found, share of our pairs the reference found)."""
    both = sum((ours & ref).values())
    return (both / sum(ref.values()) if ref else 1.0, both / sum(ours.values()) if ours else 1.0)


# --- tests ----------------------------------------------------------------------------------------------

def test_the_fixtures_are_there():
    assert len(REAL_FILES) == 6 and len(CC_FILES) == 2, "../shared/fixtures not found"


@pytest.mark.parametrize("reader", ["fastwarc", "tolerant"])
@pytest.mark.parametrize("fmt", ["warc", "wat"])
@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_pairs_agree_with_the_independent_reader(path, fmt, reader):
    ref = reference(path, fmt)
    out, kept, rejected, _ = stage(path, fmt, reader)
    assert out.status == "ok", out.error_message
    recall, precision = agreement(kept, ref["kept"])
    assert recall >= 0.98 and precision >= 0.98, (recall, precision, kept - ref["kept"],
                                                   ref["kept"] - kept)
    assert out.html_records == ref["html"]
    # every record accounted for: the same records by type as warcio, none lost
    assert out.records_by_type == dict(ref["types"])
    assert out.records_read == sum(ref["types"].values()) and out.records_lost == 0
    assert out.links_seen == out.pairs_kept + out.pairs_rejected
    wanted = "metadata" if fmt == "wat" else "response"
    assert out.metadata_records == ref["types"].get(wanted, 0)
    assert out.metadata_records == out.html_records + out.records_not_html + out.records_rejected
    assert out.records_damaged == 0 and _rejected_rows(rows_of(path, fmt, reader)) == (
        out.pairs_rejected + out.records_rejected)


def rows_of(path: Path, fmt: str, reader: str) -> list:
    return stage(path, fmt, reader)[3]


def _rejected_rows(rows) -> int:
    return sum(1 for r in rows if isinstance(r, wat.Rejected))


def _balanced(out, rows) -> bool:
    """Each rejected row is a link reject, a record rejected whole, a record read despite damage
    (bad_record) or a lost record (listed when the file was read, up to MAX_EVENTS)."""
    from udfs.extract.warc_records import MAX_EVENTS

    lost = min(out.records_lost, MAX_EVENTS) if out.records_read else 0
    return _rejected_rows(rows) == (out.pairs_rejected + out.records_rejected
                                    + out.records_damaged + lost)


def test_readme_facts_of_the_real_archives():
    """The record counts the fixtures' README states, read by the stage."""
    by_type = {p.name: stage(p, "warc")[0].records_by_type for p in REAL_FILES}
    wget = by_type["wget-2024-semanticscholar.warc.gz"]
    assert wget["response"] == 15 and wget["resource"] == 2
    assert by_type["heritrix-2014-with-revisits.warc.gz"]["revisit"] == 55
    assert by_type["heritrix-2014-with-revisits.warc.gz"]["response"] == 10
    h08 = by_type["heritrix-2008-short.warc.gz"]
    assert (h08["response"], h08["request"], h08["metadata"]) == (8, 7, 7)


def test_angle_bracket_target_uri_resolves_relative_images():
    """wget writes `WARC-Target-URI: <https://...>`: relative <img src> must resolve, not be bad_url."""
    path = REAL / "wget-2024-semanticscholar.warc.gz"
    out, kept, rejected, rows = stage(path, "warc")
    assert rejected.get("bad_url", 0) == 0
    pages = {r.page_url for r in rows if isinstance(r, wat.Pair)}
    assert pages and all(p.startswith("https://") and not p.startswith("<") for p in pages)
    assert out.quirks.get("angle_bracket_uri") == 15


def test_bare_lf_wat_record_is_read():
    """The CC-MAIN-2023-06 WAT record has bare-LF headers and no record terminator: FastWARC stops
    on it, the tolerant reader reads it (27 image links, as its JSON says)."""
    out, kept, rejected, _ = stage(REAL / "cc-2023-06-edited-length.warc.wat.gz", "wat")
    assert out.status == "ok" and out.records_read == 1 and out.html_records == 1
    assert out.links_seen == 27 and out.quirks.get("bare_lf_headers") == 1


# --- warcio's test archives (tests/fixtures/warcio, see its README) ----------------------------------

WARCIO = Path(__file__).resolve().parent / "fixtures" / "warcio"
WARCIO_FILES = sorted(p for p in WARCIO.iterdir() if p.suffix != ".md")
_WARC_LINE = re.compile(rb"(?:^|\n)WARC/1\.\d\r?\n")


def _independent_record_count(path: Path) -> int:
    """warcio's count; for the files warcio refuses (one gzip stream, broken chunks), the WARC
    header lines of the decompressed bytes."""
    import gzip

    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in ArchiveIterator(fh, arc2warc=True))
    except ArchiveLoadFailed:
        data = path.read_bytes()
        return len(_WARC_LINE.findall(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data))


@pytest.mark.parametrize("reader", ["fastwarc", "tolerant"])
@pytest.mark.parametrize("path", WARCIO_FILES, ids=lambda p: p.name)
def test_warcio_archives_are_read_whole(path, reader):
    out, kept, rejected, _ = stage(path, "warc", reader)
    assert out.records_read == _independent_record_count(path), out.records_by_type
    if path.name == "bad.arc":
        # its filedesc record says length -1: the 73 bytes of its body are skipped and counted
        assert out.status == "partial" and out.lost_reasons == {"garbage_before_record": 1}
        assert out.bytes_skipped == 73 and out.quirks["bad_arc_length"] == 3
    else:
        assert out.status == "ok", out.error_message
        assert out.records_lost == 0
    assert _balanced(out, _), out
    # Measured by hand from the bytes: example-trunc.warc's response says Content-Length 973
    # while the next `WARC/1.0` line comes 975 bytes + CRLFCRLF after its header; the ARC with a
    # space in its URL declares 1591 bytes for its last record, after which the file holds 1579
    damaged = {"example-trunc.warc": 1, "example-space-in-url.arc": 1}.get(path.name, 0)
    assert out.records_damaged == damaged
    assert len([r for r in _ if isinstance(r, wat.Rejected) and r.status == "bad_record"]) == damaged
    no_html = ("bad.arc", "example-resource.warc.gz", "example-space-in-target-uri.warc.gz")
    assert out.html_records >= (0 if path.name in no_html else 1)
    assert out.metadata_records == out.html_records + out.records_not_html + out.records_rejected


# --- no input of any kind makes the stage fail --------------------------------------------------------

def _mutants(seed: int = 12, n: int = 150):
    """Damaged copies of the real archives: cut anywhere, bytes flipped, garbage inserted, two
    files glued together, gzip members dropped."""
    import random

    rng = random.Random(seed)
    sources = [p.read_bytes() for p in ALL_FILES + WARCIO_FILES]
    for i in range(n):
        data = bytearray(rng.choice(sources))
        kind = i % 5
        if kind == 0:
            data = data[: rng.randrange(1, len(data))]
        elif kind == 1:
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 500)))
        elif kind == 3:
            data += rng.choice(sources)
        else:
            a = rng.randrange(len(data))
            del data[a:a + rng.randrange(1, 2000)]
        yield i, bytes(data)


@pytest.mark.parametrize("reader", ["fastwarc", "tolerant"])
def test_damaged_archives_never_fail_the_stage(reader):
    import io

    for fmt in ("warc", "wat"):
        for i, data in _mutants():
            rows = list(wat.extract_stream(io.BytesIO(data), f"mutant-{i}", wat.ExtractOptions(
                fmt=fmt, reader=reader)))
            out = rows[-1]
            assert isinstance(out, wat.FileOutcome) and out.status in ("ok", "partial", "failed")
            assert out.records_read == sum(out.records_by_type.values()), (i, out)
            assert out.links_seen == out.pairs_kept + out.pairs_rejected, (i, out)
            assert (out.status == "failed") == (out.records_read == 0), (i, out)
            assert _balanced(out, rows), (i, out)
            if out.status != "ok":
                assert out.error_message, (i, out)
