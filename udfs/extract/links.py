"""What both link readers return, WAT JSON (wat.py) and WARC HTML (warc_html.py).

Kept apart from both so that wat.py can call the HTML reader for WARC input while warc_html.py
returns the same record type, without the two modules importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

HTML_TYPES = ("text/html", "application/xhtml+xml")


class RecordLinks(NamedTuple):
    status: str                 # "links" | "not_html" | "invalid_json" | "missing_fields"
    error_message: str
    page_url: str | None
    base_href: str | None
    links: list                 # [(raw_url, raw_alt)] of IMG@/src links (alt None when absent)
    non_utf8: bool
    page_opt_out: str | None = None   # robots=noai, tdm-reservation=1, ... (udfs.extract.page_opt_out)
    charset: str | None = None  # WARC HTML only: where the charset came from (udfs.extract.charsets)
