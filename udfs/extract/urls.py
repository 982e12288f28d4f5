"""Image URL resolution and normalisation (pure Python, no Spark).

WAT links and `<img src>` values are often relative (`/x.png`, `//cdn/x.png`, `img/x.png`). They
resolve against the page's `<base href>` when there is one, else against the page URL, the way a
browser does. Only absolute http(s) URLs with a host are kept; everything else gets a reason
(`bad_url`, `not_http`) instead of an exception, so one odd link never stops a file.

`normalize_url` is deterministic and idempotent so later stages (dedup) can reuse it: same image,
same string.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

# The URL spec strips ASCII tab/newline anywhere and C0 control/space at both ends.
_STRIP_INSIDE = re.compile(r"[\t\n\r]")
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
# Characters left as they are when re-quoting path/query: reserved + already-escaped '%'.
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY = _SAFE_PATH + "?"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlError(ValueError):
    """A link that cannot become an absolute http(s) URL. `reason` is the rejected-row status."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def clean(raw: str) -> str:
    """Strip what browsers strip from an attribute URL before parsing it."""
    return _STRIP_INSIDE.sub("", raw).strip(_C0_AND_SPACE)


def resolve(raw: str | None, page_url: str | None, base_href: str | None = None) -> str:
    """Absolute form of `raw`: against `base_href` (itself resolved against the page) when given,
    else against `page_url`. Raises UrlError('bad_url') when that is impossible."""
    if raw is None:
        raise UrlError("missing_url", "link has no url")
    url = clean(raw)
    if not url:
        raise UrlError("bad_url", "empty url")
    base = page_url or ""
    if base_href:
        try:
            base = urljoin(base, clean(base_href)) if base else clean(base_href)
        except ValueError:
            pass  # an unparsable <base> is ignored, as browsers do
    try:
        absolute = urljoin(base, url) if base else url
    except ValueError as exc:
        # The unparsable part may be the base (page URL or <base>): an absolute URL needs none.
        try:
            has_scheme = bool(urlsplit(url).scheme)
        except ValueError:
            has_scheme = False
        if not has_scheme:
            raise UrlError("bad_url", f"cannot resolve {url[:200]!r}: {exc}") from exc
        absolute = url
    return absolute


def normalize_url(url: str, schemes: tuple[str, ...] | list[str] = ("http", "https")) -> str:
    """Canonical absolute URL: lower-case scheme and host, no default port, no fragment,
    path and query percent-encoded (existing escapes kept). Raises UrlError with reason
    `not_http` (other scheme, or relative) or `bad_url` (does not parse, no host, bad port)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
        host = parts.hostname
    except ValueError as exc:
        raise UrlError("bad_url", f"unparsable url {url[:200]!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        if not scheme:
            raise UrlError("bad_url", f"relative url without a base: {url[:200]!r}")
        raise UrlError("not_http", f"scheme {scheme!r} not in {list(schemes)}")
    if not host or any(ch in host for ch in " <>\"{}|\\^`"):
        raise UrlError("bad_url", f"url has no valid host: {url[:200]!r}")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise UrlError("bad_url", f"bad international host name {host[:100]!r}: {exc}") from exc
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{host}:{port}"
    if parts.username or parts.password:
        userinfo = quote(parts.username or "", safe="%")
        if parts.password:
            userinfo += ":" + quote(parts.password, safe="%")
        netloc = f"{userinfo}@{netloc}"
    path = quote(parts.path or "/", safe=_SAFE_PATH)
    query = quote(parts.query, safe=_SAFE_QUERY)
    return urlunsplit((scheme, netloc, path, query, ""))


def resolve_and_normalize(raw: str | None, page_url: str | None, base_href: str | None = None,
                          schemes: tuple[str, ...] | list[str] = ("http", "https")) -> str:
    """`resolve` then `normalize_url`: the one call the extractors use."""
    return normalize_url(resolve(raw, page_url, base_href), schemes)


# A URL already in canonical form: lower-case http(s) scheme and host, no port, no userinfo, no
# fragment, and only characters that normalize_url leaves as they are. Most image URLs are like
# this, and skipping urllib for them is the single largest saving of the WAT parser (bench_wat).
_CANONICAL = re.compile(r"(https?)://([a-z0-9.-]+)((?:/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*)?)"
                        r"((?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?)")
# For callers that inline Resolver.absolute's first fast path (udfs.extract.wat's per-link loop).
canonical_match = _CANONICAL.fullmatch
_PLAIN_REF = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=@%/]*")  # no ':' '?' '#' '\' or spaces


class Resolver:
    """`resolve_and_normalize` for all the links of one page, with fast paths.

    The page's effective base (page URL, or its `<base href>`) is parsed once; absolute,
    protocol-relative, root-relative and simple path-relative references are joined by string
    operations, and URLs already in canonical form skip urllib entirely. Anything unusual (dot
    segments, other schemes, non-ASCII, ports, upper case) takes the exact slow path, so the
    result is always identical to `resolve_and_normalize` (tests/test_wat_units.py checks this).
    """

    def __init__(self, page_url: str | None, base_href: str | None = None,
                 schemes: tuple[str, ...] | list[str] = ("http", "https")):
        self.page_url = page_url
        self.base_href = base_href
        self.schemes = tuple(schemes)
        # the string fast paths below keep http(s) URLs: right only when both schemes are allowed
        self._fast_ok = {"http", "https"} <= set(self.schemes)
        base = page_url or ""
        if base_href:
            try:
                base = urljoin(base, clean(base_href)) if base else clean(base_href)
            except ValueError:
                base = page_url or ""
        m = _CANONICAL.fullmatch(base) if base else None
        if m and m.group(1) in self.schemes:
            self._scheme = m.group(1)
            self._origin = f"{m.group(1)}://{m.group(2)}"
            path = m.group(3) or "/"
            self._dir = self._origin + path[: path.rfind("/") + 1]
        else:
            self._scheme = self._origin = self._dir = None

    def absolute(self, raw: str | None) -> str:
        if raw is None or not self._fast_ok:
            return resolve_and_normalize(raw, self.page_url, self.base_href, self.schemes)
        if raw.startswith(("http://", "https://")):
            candidate = raw
        elif self._origin is None:
            return resolve_and_normalize(raw, self.page_url, self.base_href, self.schemes)
        elif raw.startswith("//"):
            candidate = f"{self._scheme}:{raw}"
        elif raw.startswith("/"):
            candidate = self._origin + raw
        elif raw and _PLAIN_REF.fullmatch(raw) and "./" not in raw and raw not in (".", ".."):
            candidate = self._dir + raw
        else:
            return resolve_and_normalize(raw, self.page_url, self.base_href, self.schemes)
        m = _CANONICAL.fullmatch(candidate)
        if m is None or "/." in candidate:  # dot segments (or a rare "/." in the query): slow path
            return resolve_and_normalize(raw, self.page_url, self.base_href, self.schemes)
        host_end = m.end(2)
        if host_end == len(candidate) or candidate[host_end] == "?":  # empty path -> "/"
            return f"{candidate[:host_end]}/{candidate[host_end:]}"
        return candidate
