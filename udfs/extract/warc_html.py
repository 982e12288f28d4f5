"""`<img src alt>` of an HTML page from a WARC response record (pure Python, selectolax/lexbor).

lexbor is a fast HTML5 parser that, like a browser, never fails on broken markup, decodes entities
in attribute values and sees `<img>` inside `<noscript>`. The page's `<base href>` is returned so
relative `src` values resolve exactly as in the WAT path (udfs.extract.wat.LinkRules).

`response_body` is the HTTP layer in front of it (udfs.extract.http_message: tolerant of what archive
tools store), and the text is decoded by udfs.extract.charsets (header, BOM, meta, detection).
"""

from __future__ import annotations

from udfs.extract import charsets, http_message, page_opt_out
from udfs.extract.links import HTML_TYPES, RecordLinks


def is_html(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() in HTML_TYPES


def decode_html(body: bytes, content_type: str | None = None) -> tuple[str, bool]:
    """-> (text, non_utf8): the charset rules of udfs.extract.charsets; undecodable bytes become U+FFFD."""
    d = charsets.decode_html(body, content_type)
    return d.text, d.lossy


def response_body(block: bytes, warc_headers, target_uri: str | None, log
                  ) -> tuple[bytes, str | None, tuple[str, str] | None]:
    """-> (body, content type, problem) of a WARC/ARC response record's block. `problem` is
    (status, message) for a record that cannot be an HTML page's response; quirks of the HTTP
    layer (bare LF, encodings that do not match the stored body) are counted in `log`."""
    wct = (warc_headers.get("Content-Type") or "").lower()
    if target_uri and not target_uri.lower().startswith(("http:", "https:")):
        return b"", None, ("not_html", "")                      # dns:, ftp:, whois: records
    if wct and not wct.startswith("application/http") and wct != "application/octet-stream":
        # some tools store the document itself as the response block
        if is_html(wct):
            log.quirk("response_without_http_headers")
            return block, wct, None
        return b"", None, ("not_html", "")
    resp = http_message.parse_response(block)
    for q in resp.quirks:
        log.quirk(q)
    return resp.body, resp.content_type, None


def html_links(body: bytes, page_url: str | None, content_type: str | None = None) -> RecordLinks:
    """Image links of one response body: [(src, alt)] in document order, alt None when absent."""
    from selectolax.lexbor import LexborHTMLParser

    if not is_html(content_type):
        return RecordLinks("not_html", "", page_url, None, [], False)
    decoded = charsets.decode_html(body, content_type)
    try:
        tree = LexborHTMLParser(decoded.text)
    except Exception as exc:  # noqa: BLE001 - lexbor is lenient; this guards against its rare errors
        return RecordLinks("bad_html", f"HTML parser failed: {str(exc)[:200]}", page_url, None, [],
                           decoded.lossy, charset=decoded.source)
    base_node = tree.css_first("base[href]")
    base = base_node.attributes.get("href") if base_node is not None else None
    links = []
    for node in tree.css("img"):
        attrs = node.attributes
        links.append((attrs.get("src"), attrs.get("alt") if "alt" in attrs else None))
    opt_out = page_opt_out.from_html_tree(tree) if links else None
    if page_url is None and links:
        return RecordLinks("missing_fields", "response has images but no WARC-Target-URI",
                           None, base, links, decoded.lossy, charset=decoded.source, page_opt_out=opt_out)
    return RecordLinks("links", "", page_url, base, links, decoded.lossy, charset=decoded.source,
                       page_opt_out=opt_out)
