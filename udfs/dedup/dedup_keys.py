"""The dedup keys: which (url, text) pairs count as "the same pair", and which URLs as "the same URL".

Normalisation (idempotent; applied to both parts before hashing):
- text: every run of Unicode whitespace (the characters `str.isspace()` accepts: ASCII space, tab,
  newlines, NBSP, the U+2000 spaces, ideographic space, ...) becomes one ASCII space, and the
  ends are stripped. Case and punctuation are kept: they change the meaning of a caption.
- url: surrounding whitespace stripped; the fragment (`#...`) removed, since it never reaches the
  server; the scheme and the host (not the user-info, path or query) lower-cased, ASCII letters
  only (hosts are ASCII: international names travel as punycode). Nothing else changes: the path
  and query are case-sensitive on most servers.
- a null url or text counts as "".

The pair key is `url + "\\t" + text`; after normalisation the text holds no tab, so the key is
unambiguous. The URL key (failed-URL filter) is the normalised url alone.

`wat_extract` output is already normalised more strongly (`udfs.extract.urls.normalize_url`: default ports,
percent-encoding); this cheap subset is re-applied so pairs from other sources or older extractions
still match. The Spark stage evaluates the same rules in the JVM (`spark_jobs.columns`),
from the patterns below, and a test checks that both give identical keys.
"""

from __future__ import annotations

import re

# The code points str.isspace() accepts, as inclusive ranges.
WHITESPACE_RANGES = ((0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                     (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                     (0x3000, 0x3000))
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_ASCII_LOWER = str.maketrans(_UPPER, _LOWER)
WHITESPACE_CHARS = "".join(chr(c) for a, b in WHITESPACE_RANGES for c in range(a, b + 1))
# Groups: scheme, "//" + user-info (optional, kept as is), host[:port], rest (path, query).
URL_PATTERN = r"([A-Za-z][A-Za-z0-9+.\-]*:)(//[^/?#@]*@|//)([^/?#]*)(.*)"
# scheme://authority: the part lower-cased when it holds no user-info (the usual case, one regex).
AUTHORITY_PREFIX = r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*"


def whitespace_class(dialect: str = "python") -> str:
    """A regex character class of WHITESPACE_RANGES for Python `re` or Java (Spark) regex."""
    def cp(c: int) -> str:
        return f"\\x{{{c:X}}}" if dialect == "java" else f"\\u{c:04x}"
    parts = [cp(a) if a == b else f"{cp(a)}-{cp(b)}" for a, b in WHITESPACE_RANGES]
    return "[" + "".join(parts) + "]"


_WS_RUN = re.compile(whitespace_class() + "+")
_WS_ENDS = re.compile(f"^{whitespace_class()}+|{whitespace_class()}+$")
_URL_RE = re.compile(URL_PATTERN, re.S)


def normalize_text(text: str | None) -> str:
    return _WS_RUN.sub(" ", text or "").strip(" ")


def normalize_url_key(url: str | None) -> str:
    url = _WS_ENDS.sub("", url or "").split("#", 1)[0]
    m = _URL_RE.fullmatch(url)
    if not m:
        return url
    scheme, authority, host, rest = m.groups()
    return scheme.translate(_ASCII_LOWER) + authority + host.translate(_ASCII_LOWER) + rest


def pair_key(url: str | None, text: str | None) -> str:
    return normalize_url_key(url) + "\t" + normalize_text(text)


def url_key(url: str | None) -> str:
    return normalize_url_key(url)
