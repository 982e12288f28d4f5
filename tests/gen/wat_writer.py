"""Synthetic Common Crawl WAT files, written with warcio, with their expected extraction results.

Each page becomes the three metadata records a real WAT holds per capture (request, response,
fetch metadata), after one warcinfo record. The response record's JSON has the real nesting
(`Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata.Links`), `A@/href` links next to
the `IMG@/src` ones, and optionally a `__base__` link.

Expectations are declared by construction, not computed by the code under test: every image is
built from its absolute URL and a case (relative, protocol-relative, <base>-relative, short alt,
not http, ...), and carries the status and url/text the extractor must produce.

API (used by tests, the benchmark and the demo):
    pages_for_images(images, page_base=..., per_page=4, seed=0) -> list[Page]
        images: [(absolute_url, alt_text)]; each is written in a mix of absolute, root-relative,
        protocol-relative, path-relative and <base>-relative forms that resolve back to the URL.
    random_pages(n_pages, seed=0, image_base=..., ...) -> list[Page]   (every kind of link case)
    write_wat(path, items, gzip=True, warcinfo=True) -> WatSummary
        items: Page or RawRecord; the summary holds the expected pairs, rejects by status,
        record counts and each item's byte offsets.
    bad_case_files(folder, seed=0) -> dict[name, BadFile]   (one file per bad case of the issue)
    write_paths_file(path, entries, gzip=False)
"""

from __future__ import annotations

import gzip as gzip_mod
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from warcio.warcwriter import WARCWriter

# Multilingual alt-texts (all >= 5 characters after whitespace normalisation).
ALTS = [
    "A red bicycle leaning against a wall", "Sunset over the harbour in Lisbon",
    "Ein Hund spielt im Schnee", "Frische Brötchen vom Bäcker", "Le chat dort sur le canapé",
    "Vue de la tour Eiffel la nuit", "Una paella valenciana en la mesa", "Playa de arena blanca",
    "東京の夜景と高層ビル", "富士山の朝の風景", "长城上的日出景色", "一碗热腾腾的拉面",
    "Красная площадь зимой", "Кот сидит на подоконнике", "قطة تنام على الأريكة",
    "Ένα σκάφος στο λιμάνι", "서울의 밤 풍경 사진", "Logo of the company", "Product photo: blue mug",
]
WORDS = ("alpha beta gamma delta news sport city photo gallery blog post archive tag category "
         "home about contact shop cart product item review travel food music video world").split()


@dataclass
class Img:
    """One IMG@/src link as written, and what the extractor must make of it."""
    src: str | None
    alt: str | None                 # None: no alt key at all
    expect_status: str              # "keep" or a reject status (alt_too_short, not_http, ...)
    expect_url: str | None = None   # normalised absolute URL for kept (and URL-valid) links
    expect_text: str | None = None
    expect_truncated: bool = False


@dataclass
class Page:
    url: str
    images: list[Img]
    base: str | None = None         # written as a `__base__` link before the images
    n_anchor_links: int = 20
    title: str = "page"
    lang: str = "en"


@dataclass
class RawRecord:
    """A metadata record with a payload written byte for byte (invalid JSON, non-UTF-8, ...)."""
    payload: bytes
    target_uri: str = "https://bad.example.org/page"
    expect_record_status: str | None = None   # record-level reject status, None if not rejected
    expect_pairs: list[tuple[str, str]] = field(default_factory=list)
    expect_link_rejects: dict[str, int] = field(default_factory=dict)
    non_utf8: bool = False


@dataclass
class WatSummary:
    path: str
    records: int = 0
    metadata_records: int = 0
    html_records: int = 0
    links: int = 0
    pairs: list[tuple[str, str]] = field(default_factory=list)      # (url, text), in file order
    truncated_pairs: int = 0
    link_rejects: Counter = field(default_factory=Counter)
    record_rejects: Counter = field(default_factory=Counter)
    non_utf8_records: int = 0
    # per item: (first byte, end byte) in the file, and the byte range of its response record
    offsets: list[tuple[int, int]] = field(default_factory=list)
    response_offsets: list[tuple[int, int] | None] = field(default_factory=list)
    item_pairs: list[int] = field(default_factory=list)              # expected pairs per item
    compressed_bytes: int = 0


@dataclass
class BadFile:
    path: str
    expect_status: str              # ok | partial | failed
    expect_error: str | None        # reason prefix of error_message
    summary: WatSummary | None      # expected rows (for truncated files: the part before the cut)
    prefix_only: bool = False       # the kept pairs are a non-empty prefix of summary.pairs


# --- pages ----------------------------------------------------------------------------------------

def _relative_forms(abs_url: str, page_url: str, rng: random.Random) -> tuple[str, str | None]:
    """A (src, base) pair that resolves to `abs_url` from `page_url`: absolute, protocol-relative,
    root-relative, path-relative to the page, or relative to a <base href> on another host."""
    u, p = urlsplit(abs_url), urlsplit(page_url)
    same_origin = (u.scheme, u.netloc) == (p.scheme, p.netloc)
    path_q = u.path + (f"?{u.query}" if u.query else "")
    choice = rng.random()
    if choice < 0.25:
        return abs_url, None
    if choice < 0.45 and u.scheme == p.scheme:
        return f"//{u.netloc}{path_q}", None
    if choice < 0.65 and same_origin:
        return path_q, None
    if choice < 0.8 and same_origin:
        page_dir = p.path.rsplit("/", 1)[0] + "/"
        if u.path.startswith(page_dir) and len(u.path) > len(page_dir):
            return u.path[len(page_dir):] + (f"?{u.query}" if u.query else ""), None
        return path_q, None
    # relative to a <base href> that points at the image's directory
    directory, name = u.path.rsplit("/", 1)
    return name + (f"?{u.query}" if u.query else ""), f"{u.scheme}://{u.netloc}{directory}/"


def pages_for_images(images: list[tuple[str, str | None]], page_base: str = "http://127.0.0.1:8000/pages/",
                     per_page: int = 4, seed: int = 0, n_anchor_links: int = 10,
                     min_alt_length: int = 5) -> list[Page]:
    """Pages that together reference exactly `images` ([(absolute_url, alt)]), in relative and
    absolute forms. `absolute_url` must be normalised already (lower-case host, no default port,
    no fragment, percent-encoded). Expected status per image: keep, or alt_too_short /
    empty_alt / missing_alt (alt None) by the whitespace-normalised alt length."""
    rng = random.Random(seed)
    pages: list[Page] = []
    for start in range(0, len(images), per_page):
        page_url = f"{page_base.rstrip('/')}/page{start // per_page:05d}.html"
        chunk = images[start:start + per_page]
        base = None
        imgs = []
        for abs_url, alt in chunk:
            src, want_base = _relative_forms(abs_url, page_url, rng)
            if want_base is not None and base is None and not imgs:
                base = want_base          # one <base> per page, before any image resolves
            elif want_base is not None:
                src = abs_url
            if base is not None and want_base is None and not src.startswith(("http:", "https:")):
                src = abs_url             # other images of a <base> page are written absolute
            text = " ".join(alt.split()) if alt is not None else None
            status = ("missing_alt" if alt is None else "empty_alt" if not text
                      else "alt_too_short" if len(text) < min_alt_length else "keep")
            imgs.append(Img(src, alt, status, abs_url, text))
        pages.append(Page(page_url, imgs, base=base, n_anchor_links=n_anchor_links,
                          title=f"page {start // per_page}"))
    return pages


def _word(rng: random.Random) -> str:
    # Words plus a small number: about the redundancy of real URL paths (WAT gzip ratio ~3-4x).
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}{rng.randrange(1000)}"


def random_pages(n_pages: int, seed: int = 0, image_base: str = "https://img.example.com/",
                 page_hosts: tuple[str, ...] = ("https://www.example.org", "http://blog.example.net",
                                                "https://news.example.de"),
                 images_per_page: tuple[int, int] = (3, 12), n_anchor_links: int = 40,
                 bad_link_rate: float = 0.15, long_alt: int = 5000) -> list[Page]:
    """Pages with every kind of image link: kept ones in every relative form (same-host and
    `image_base` hosts) and, at `bad_link_rate`, rejected ones of every link-level reason."""
    rng = random.Random(seed)
    pages = []
    for i in range(n_pages):
        host = page_hosts[i % len(page_hosts)]
        page_url = f"{host}/{_word(rng)}/{_word(rng)}-{i}.html"
        base = None
        imgs: list[Img] = []
        if rng.random() < 0.1:  # a page whose relative images resolve against <base href>
            base = f"{image_base.rstrip('/')}/base{i}/"
        for j in range(rng.randint(*images_per_page)):
            alt = rng.choice(ALTS)
            if rng.random() < bad_link_rate:
                imgs.append(_bad_img(rng, page_url, base, i, j, long_alt))
                continue
            if base is not None:
                name = f"{_word(rng)}-{j}.jpg"
                abs_url = f"{base}{name}"
                imgs.append(Img(name, alt, "keep", abs_url, alt))
                continue
            origin = host if rng.random() < 0.5 else image_base.rstrip("/")
            abs_url = f"{origin}/{_word(rng)}/{_word(rng)}-{j}.jpg"
            src, want_base = _relative_forms(abs_url, page_url, rng)
            if want_base is not None:
                src = abs_url
            # whitespace around and inside alt-text is normalised
            raw_alt = f"  {alt.replace(' ', chr(10) + ' ', 1)} " if rng.random() < 0.2 else alt
            imgs.append(Img(src, raw_alt, "keep", abs_url, alt))
        pages.append(Page(page_url, imgs, base=base, n_anchor_links=n_anchor_links,
                          title=f"{_word(rng)} {_word(rng)}", lang=rng.choice(["en", "de", "fr", "ja"])))
    return pages


def _bad_img(rng: random.Random, page_url: str, base: str | None, i: int, j: int,
             long_alt: int) -> Img:
    origin = "https://img.example.com"
    ok_url = f"{origin}/bad/{i}-{j}.png"
    kind = rng.choice(["short", "missing_alt", "empty", "not_http", "bad_url", "bad_port",
                       "long", "missing_url", "entity"])
    if kind == "short":
        return Img(ok_url, "logo", "alt_too_short", ok_url, "logo")
    if kind == "missing_alt":
        return Img(ok_url, None, "missing_alt", ok_url)
    if kind == "empty":
        return Img(ok_url, " \t ", "empty_alt", ok_url, "")
    if kind == "not_http":
        src = rng.choice(["data:image/png;base64,iVBORw0KGgo=", "ftp://files.example.com/a.png",
                          "javascript:void(0)"])
        return Img(src, "A picture that is not on the web", "not_http")
    if kind == "bad_url":
        return Img("http://[::1/broken.png", "Broken IPv6 address in URL", "bad_url")
    if kind == "bad_port":
        return Img("http://example.com:99999/a.png", "Port out of range here", "bad_url")
    if kind == "missing_url":
        return Img(None, "An image link with no url", "missing_url")
    if kind == "entity":  # WAT alt values may keep HTML entities; they are decoded
        return Img(ok_url, "Fish &amp; chips &#8211; tasty", "keep", ok_url, "Fish & chips \u2013 tasty")
    text = ("very long alt text " * (long_alt // 19 + 2))
    capped = " ".join(text.split())[:4096].rstrip()
    return Img(ok_url, text, "keep", ok_url, capped, expect_truncated=True)


# --- JSON payloads --------------------------------------------------------------------------------

def _warc_date(i: int) -> str:
    return f"2024-05-18T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}Z"


def _request_json(page_url: str, i: int) -> dict:
    u = urlsplit(page_url)
    return {"Container": {"Filename": "CC-MAIN-20240517233122-20240518023122-00000.warc.gz",
                          "Compressed": True, "Offset": str(1000 * i)},
            "Envelope": {"Format": "WARC", "WARC-Header-Length": "357",
                         "WARC-Header-Metadata": {"WARC-Type": "request", "WARC-Date": _warc_date(i),
                                                  "WARC-Target-URI": page_url},
                         "Payload-Metadata": {
                             "Actual-Content-Type": "application/http; msgtype=request",
                             "HTTP-Request-Metadata": {
                                 "Request-Message": {"Method": "GET", "Path": u.path, "Version": "HTTP/1.1"},
                                 "Headers": {"User-Agent": "CCBot/2.0 (https://commoncrawl.org/faq/)",
                                             "Host": u.netloc}}}}}


def _response_json(page: Page, i: int, rng: random.Random) -> dict:
    links: list[dict] = []
    if page.base is not None:
        links.append({"path": "__base__", "url": page.base})
    for k in range(page.n_anchor_links):
        links.append({"path": "A@/href", "url": f"/{_word(rng)}/{_word(rng)}-{k}",
                      "text": f"{_word(rng)} {_word(rng)}"})
        if k == page.n_anchor_links // 2:
            for img in page.images:
                link: dict = {"path": "IMG@/src"}
                if img.src is not None:
                    link["url"] = img.src
                if img.alt is not None:
                    link["alt"] = img.alt
                links.append(link)
    if page.n_anchor_links == 0:
        for img in page.images:
            link = {"path": "IMG@/src"}
            if img.src is not None:
                link["url"] = img.src
            if img.alt is not None:
                link["alt"] = img.alt
            links.append(link)
    return {"Container": {"Filename": "CC-MAIN-20240517233122-20240518023122-00000.warc.gz",
                          "Compressed": True, "Offset": str(1000 * i + 500)},
            "Envelope": {"Format": "WARC", "WARC-Header-Length": "520",
                         "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Date": _warc_date(i),
                                                  "WARC-Target-URI": page.url,
                                                  "WARC-Identified-Payload-Type": "text/html"},
                         "Payload-Metadata": {
                             "Actual-Content-Type": "application/http; msgtype=response",
                             "HTTP-Response-Metadata": {
                                 "Response-Message": {"Version": "HTTP/1.1", "Status": "200", "Reason": "OK"},
                                 "Headers": {"Content-Type": "text/html; charset=UTF-8",
                                             "Server": "nginx", "Content-Language": page.lang},
                                 "HTML-Metadata": {
                                     "Head": {"Title": page.title,
                                              "Metas": [{"name": "viewport", "content": "width=device-width"},
                                                        {"property": "og:title", "content": page.title}],
                                              "Link": [{"path": "LINK@/href", "url": "/style.css",
                                                        "rel": "stylesheet"}]},
                                     "Links": links}}}}}


def _fetch_json(page_url: str, i: int) -> dict:
    return {"Envelope": {"Format": "WARC",
                         "WARC-Header-Metadata": {"WARC-Type": "metadata", "WARC-Date": _warc_date(i),
                                                  "WARC-Target-URI": page_url},
                         "Payload-Metadata": {"Actual-Content-Type": "application/warc-fields",
                                              "WARC-Metadata-Metadata": {"Metadata-Records": [
                                                  {"Name": "fetchTimeMs", "Value": str(100 + i % 900)}]}}}}


# --- writing --------------------------------------------------------------------------------------

def _metadata_record(writer: WARCWriter, uri: str, payload: bytes, date: str):
    return writer.create_warc_record(uri, "metadata", payload=io.BytesIO(payload),
                                     length=len(payload), warc_content_type="application/json",
                                     warc_headers_dict={"WARC-Date": date})


def write_wat(path: str | Path, items: list, gzip: bool = True, warcinfo: bool = True,
              seed: int = 0, filename: str = "CC-MAIN-20240517233122-20240518023122-00000.warc.wat.gz",
              ) -> WatSummary:
    """Write `items` (Page / RawRecord) as a WAT file; return what extraction must find."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = WatSummary(str(path))
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=gzip)
        if warcinfo:
            writer.write_record(writer.create_warcinfo_record(filename, {
                "software": "clipcrawl tests/gen/wat_writer.py", "format": "WARC File Format 1.0"}))
            s.records += 1
        for i, item in enumerate(items):
            start = fh.tell()
            if isinstance(item, RawRecord):
                writer.write_record(_metadata_record(writer, item.target_uri, item.payload, _warc_date(i)))
                s.records += 1
                s.metadata_records += 1
                s.response_offsets.append((start, fh.tell()))
                if item.expect_record_status:
                    s.record_rejects[item.expect_record_status] += 1
                if item.expect_pairs or item.expect_link_rejects:
                    s.html_records += 1
                s.pairs.extend(item.expect_pairs)
                s.links += len(item.expect_pairs) + sum(item.expect_link_rejects.values())
                s.link_rejects.update(item.expect_link_rejects)
                s.non_utf8_records += item.non_utf8
                s.item_pairs.append(len(item.expect_pairs))
                s.offsets.append((start, fh.tell()))
                continue
            page: Page = item
            for payload_obj in (_request_json(page.url, i),):
                writer.write_record(_metadata_record(writer, page.url, _dumps(payload_obj), _warc_date(i)))
            r_start = fh.tell()
            writer.write_record(_metadata_record(writer, page.url, _dumps(_response_json(page, i, rng)),
                                                 _warc_date(i)))
            s.response_offsets.append((r_start, fh.tell()))
            writer.write_record(_metadata_record(writer, page.url, _dumps(_fetch_json(page.url, i)),
                                                 _warc_date(i)))
            s.records += 3
            s.metadata_records += 3
            s.html_records += 1
            kept = 0
            for img in page.images:
                s.links += 1
                if img.expect_status == "keep":
                    s.pairs.append((img.expect_url, img.expect_text))
                    s.truncated_pairs += img.expect_truncated
                    kept += 1
                else:
                    s.link_rejects[img.expect_status] += 1
            s.item_pairs.append(kept)
            s.offsets.append((start, fh.tell()))
    s.compressed_bytes = path.stat().st_size
    return s


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_paths_file(path: str | Path, entries: list[str], gzip: bool = False) -> Path:
    path = Path(path)
    data = ("\n".join(entries) + "\n").encode("utf-8")
    path.write_bytes(gzip_mod.compress(data) if gzip else data)
    return path


# --- the bad cases of the issue -------------------------------------------------------------------

def _img_link_json(page_url: str, links: list[dict], header_uri: bool = True) -> dict:
    hdr = {"WARC-Type": "response", "WARC-Date": "2024-05-18T00:00:00Z"}
    if header_uri:
        hdr["WARC-Target-URI"] = page_url
    return {"Envelope": {"WARC-Header-Metadata": hdr, "Payload-Metadata": {"HTTP-Response-Metadata": {
        "HTML-Metadata": {"Links": links}}}}}


def bad_records() -> list[RawRecord]:
    """Record-level bad cases that live inside an otherwise valid file."""
    page = "https://bad.example.org/dir/page.html"
    good = json.dumps(_img_link_json(page, [{"path": "IMG@/src", "url": "ok.png",
                                             "alt": "A good image next to bad ones"}])).encode()
    latin1 = (b'{"Envelope":{"WARC-Header-Metadata":{"WARC-Target-URI":"' + page.encode() + b'"},'
              b'"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Links":['
              b'{"path":"IMG@/src","url":"/caf\xe9.png","alt":"Caf\xe9 au lait \xe0 Paris"}]}}}}}')
    return [
        RawRecord(good, page, None, [("https://bad.example.org/dir/ok.png", "A good image next to bad ones")]),
        RawRecord(good[: len(good) // 2], page, "invalid_json"),                     # cut JSON
        RawRecord(b"this is not json at all", page, "invalid_json"),
        RawRecord(json.dumps({"Container": {"Filename": "x"}}).encode(), page, "missing_fields"),
        RawRecord(json.dumps({"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {
            "HTML-Metadata": {"Links": "not-a-list"}}}}}).encode(), page, "missing_fields"),
        RawRecord(json.dumps(_img_link_json(page, [
            {"path": "IMG@/src", "alt": "Image link without its url"},
            {"path": "IMG@/src", "url": "http://[::1/x.png", "alt": "Unparsable IPv6 host"},
            {"url": "/no-path.png", "alt": "A link with no path key"},
        ])).encode(), page, None, [], {"missing_url": 1, "bad_url": 1}),
        # non-UTF-8 bytes: decoded with U+FFFD, the pair is kept
        RawRecord(latin1, page, None, [("https://bad.example.org/caf%EF%BF%BD.png",
                                        "Caf\ufffd au lait \ufffd Paris")], non_utf8=True),
    ]


def bad_case_files(folder: str | Path, seed: int = 0) -> dict[str, BadFile]:
    """One file per bad case of the issue, each with what its outcome must be."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, BadFile] = {}

    # A valid file with pages and the record-level bad cases (invalid JSON, missing fields,
    # non-UTF-8 bytes, a very long alt-text, unparsable URLs) mixed in.
    pages = random_pages(6, seed=seed, bad_link_rate=0.3)
    pages[0].images.append(Img("https://img.example.com/long.png", "x " * 6000, "keep",
                               "https://img.example.com/long.png", ("x " * 2048).strip(),
                               expect_truncated=True))
    items = pages[:3] + bad_records() + pages[3:]
    p = folder / "CC-MAIN-2024-22-mixed.warc.wat.gz"
    out["mixed"] = BadFile(str(p), "ok", None, write_wat(p, items, seed=seed))

    # Truncated gzip: cut in the middle of a later page's response member.
    full = folder / "full-for-truncation.wat.gz.src"
    pages = random_pages(8, seed=seed + 1, bad_link_rate=0.0)
    s = write_wat(full, pages, seed=seed)
    cut_item = 5
    r0, r1 = s.response_offsets[cut_item]
    data = full.read_bytes()[: (r0 + r1) // 2]
    p = folder / "CC-MAIN-2024-22-truncated.warc.wat.gz"
    p.write_bytes(data)
    full.unlink()
    expected = WatSummary(str(p), pairs=s.pairs[: sum(s.item_pairs[:cut_item])])
    expected.links = len(expected.pairs)
    out["truncated"] = BadFile(str(p), "partial", "truncated_gzip", expected)

    # Not gzip (and not WARC) at all.
    p = folder / "not-gzip.warc.wat.gz"
    p.write_bytes(b"<html><body>Oops, an error page saved as a WAT file</body></html>\n" * 20)
    out["not_gzip"] = BadFile(str(p), "failed", "not_warc", None)

    # 0-byte file.
    p = folder / "empty.warc.wat.gz"
    p.write_bytes(b"")
    out["empty"] = BadFile(str(p), "failed", "empty_file", None)

    # Only warcinfo + request metadata (like the real whirlwind.warc.wat.gz): ok, nothing to take.
    p = folder / "request-only.warc.wat.gz"
    with open(p, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        w.write_record(w.create_warcinfo_record("request-only.warc.wat.gz", {"format": "WARC"}))
        for i in range(3):
            w.write_record(_metadata_record(w, f"https://example.org/{i}",
                                            _dumps(_request_json(f"https://example.org/{i}", i)),
                                            _warc_date(i)))
    out["request_only"] = BadFile(str(p), "ok", None, WatSummary(str(p), records=4, metadata_records=3))

    # Uncompressed WAT (allowed by the WARC spec): read as is.
    p = folder / "plain.warc.wat"
    out["plain"] = BadFile(str(p), "ok", None, write_wat(p, random_pages(2, seed=seed + 2,
                                                                         bad_link_rate=0.0), gzip=False))

    # One gzip stream for the whole file instead of one member per record (valid, unusual),
    # complete and truncated: the truncation must be noticed here too.
    plain_src = folder / "single-stream.src"
    s = write_wat(plain_src, random_pages(6, seed=seed + 3, bad_link_rate=0.0), gzip=False)
    data = gzip_mod.compress(plain_src.read_bytes())
    plain_src.unlink()
    p = folder / "single-stream.warc.wat.gz"
    p.write_bytes(data)
    out["single_stream"] = BadFile(str(p), "ok", None, WatSummary(
        str(p), records=s.records, metadata_records=s.metadata_records, html_records=s.html_records,
        links=s.links, pairs=s.pairs))
    p = folder / "single-stream-truncated.warc.wat.gz"
    p.write_bytes(data[: len(data) * 2 // 3])
    out["single_stream_truncated"] = BadFile(str(p), "partial", "truncated_gzip",
                                             WatSummary(str(p), pairs=s.pairs), prefix_only=True)

    # A path that does not exist (listed in the paths file by the tests).
    out["missing"] = BadFile(str(folder / "does-not-exist.warc.wat.gz"), "failed", "file_not_found", None)
    return out
