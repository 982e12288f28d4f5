"""`<img src alt>` of an HTML page from a WARC response record (pure Python, selectolax/lexbor).

lexbor is a fast HTML5 parser that, like a browser, never fails on broken markup, decodes entities
in attribute values and sees `<img>` inside `<noscript>`. The page's `<base href>` is returned so
relative `src` values resolve exactly as in the WAT path (udfs.wat.LinkRules).
"""

from __future__ import annotations

import codecs
import re

from udfs import page_opt_out
from udfs.wat import HTML_TYPES, RecordLinks

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_CT_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.I)


def is_html(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() in HTML_TYPES


def decode_html(body: bytes, content_type: str | None = None) -> tuple[str, bool]:
    """-> (text, non_utf8). Charset from the HTTP header, else a `<meta charset>` in the first 4 KB,
    else UTF-8; undecodable bytes become U+FFFD (and non_utf8 is True)."""
    charset = None
    if content_type:
        m = _CT_CHARSET.search(content_type)
        charset = m.group(1) if m else None
    if charset is None:
        m = _META_CHARSET.search(body[:4096])
        charset = m.group(1).decode("ascii", "replace") if m else None
    try:
        codec = codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        codec = "utf-8"
    try:
        return body.decode(codec), False
    except UnicodeDecodeError:
        return body.decode(codec, "replace"), True


def html_links(body: bytes, page_url: str | None, content_type: str | None = None) -> RecordLinks:
    """Image links of one response body: [(src, alt)] in document order, alt None when absent."""
    from selectolax.lexbor import LexborHTMLParser

    if not is_html(content_type):
        return RecordLinks("not_html", "", page_url, None, [], False)
    text, non_utf8 = decode_html(body, content_type)
    try:
        tree = LexborHTMLParser(text)
    except Exception as exc:  # noqa: BLE001 - lexbor is lenient; this guards against its rare errors
        return RecordLinks("bad_html", f"HTML parser failed: {str(exc)[:200]}", page_url, None, [],
                           non_utf8)
    base_node = tree.css_first("base[href]")
    base = base_node.attributes.get("href") if base_node is not None else None
    links = []
    for node in tree.css("img"):
        attrs = node.attributes
        links.append((attrs.get("src"), attrs.get("alt") if "alt" in attrs else None))
    opt_out = page_opt_out.from_html_tree(tree) if links else None
    if page_url is None and links:
        return RecordLinks("missing_fields", "response has images but no WARC-Target-URI",
                           None, base, links, non_utf8, opt_out)
    return RecordLinks("links", "", page_url, base, links, non_utf8, opt_out)
