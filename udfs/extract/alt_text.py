"""Alt-text cleaning (pure Python): whitespace normalisation, a length cap, a minimum length.

LAION drops alt-text shorter than 5 characters. Very long alt-text (whole paragraphs, base64 junk)
is truncated rather than dropped, and the row is flagged `alt_truncated`, so a consumer can filter
it. Lengths are counted in Unicode code points, after normalisation.
"""

from __future__ import annotations

import html
from typing import NamedTuple


class AltResult(NamedTuple):
    text: str | None        # the cleaned text (also for rejects), None when there was no alt
    status: str | None      # None when kept, else missing_alt | empty_alt | alt_too_short
    truncated: bool


def normalize_whitespace(text: str) -> str:
    """Collapse every run of Unicode whitespace (incl. NBSP, ideographic space) to one space."""
    return " ".join(text.split())


def clean_alt(raw: str | None, min_length: int = 5, max_length: int = 4096,
              unescape: bool = False) -> AltResult:
    """Clean one alt attribute. `unescape` decodes HTML entities left in WAT alt values (HTML
    parsers have already decoded them for WARC input)."""
    if raw is None:
        return AltResult(None, "missing_alt", False)
    text = raw
    if unescape and "&" in text:
        text = html.unescape(text)
    # Drop NULs and lone surrogates (from non-UTF-8 input): parquet strings must be valid UTF-8.
    if "\x00" in text:
        text = text.replace("\x00", " ")
    text = normalize_whitespace(text)
    if not text:
        return AltResult("", "empty_alt", False)
    if len(text) < min_length:
        return AltResult(text, "alt_too_short", False)
    if len(text) > max_length:
        return AltResult(normalize_whitespace(text[:max_length]), None, True)
    return AltResult(text, None, False)
