"""HTTP fetching of one image URL, politely and safely.

What img2dataset users fight with, handled here:
- the opt-out headers (`X-Robots-Tag: noai, noimageai, noml, noindex, noimageindex`, TDMRep's
  `tdm-reservation: 1`) and the content type are checked on the response headers BEFORE the body
  is read; an opted-out body is never downloaded (the connection is closed after the headers);
- a consent gate (`udfs.download.robots.HostPolicies.check` plus the opt-out list) is asked before EVERY
  hop is requested: a URL that robots.txt, tdmrep.json or an opt-out list rules out is never sent;
- the address guard (`udfs.download.address_guard`) runs on EVERY hop: redirects are followed here, by hand,
  and each Location is resolved and vetted before it is connected to; the connection goes to the
  vetted address (no second DNS lookup), and redirects are capped and loops detected;
- retries with exponential backoff and full jitter on 429, 5xx and network errors, honouring a
  `Retry-After` header (seconds or HTTP date) up to `backoff_max`; a longer Retry-After is not
  waited for: the row fails as retryable, for a later `--retry-failed` run;
- a per-domain concurrency cap shared by all threads of a fetcher (one shard), released while a
  thread sleeps in backoff, and a per-host cap shared by all threads of ALL processes of the
  machine (`download.per_host_concurrency`, `udfs.download.host_slots`: Spark runs one Python worker
  process per task slot, so a per-process cap would still multiply by the cores);
- keep-alive: idle connections are kept per (scheme, host, port, vetted address) and reused by the
  next request to the same host, so a shard opens a handful of TCP/TLS connections per host, not
  one per image. A connection is reused only for the very address the guard vetted on this hop
  (a redirect to another host or address gets its own), only after its response was read to the
  end (small error and redirect bodies are drained; an opted-out body is never read, so that
  connection is closed), and a reused connection the server had closed is retried once on a
  fresh one (GET is idempotent);
- a per-process DNS cache of the guard's vetted answers (`udfs.download.address_guard.DnsCache`);
- connect and read timeouts plus a total deadline (a server dripping one byte per second does not
  hold a thread forever) and a cap on body bytes (Content-Length checked first).

Built on `http.client` rather than urllib/requests: we need the headers before the body, the
connection pinned to the vetted address, and no proxy/redirect magic from the environment.
"""

from __future__ import annotations

import email.utils
import http.client
import random
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from udfs.download.address_guard import AddressGuard, BlockedAddress, ResolveError, worker_dns_cache
from udfs.download.host_slots import HostSlots

REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)
_CHUNK = 1 << 16


@dataclass
class FetchConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 60.0
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_redirects: int = 5
    max_image_bytes: int = 20_000_000
    per_domain_concurrency: int = 4
    user_agent: str = "clipcrawl"
    respect_opt_out: bool = True
    tdmrep: bool = True         # also honour the `tdm-reservation: 1` response header
    opt_out_values: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    allowed_content_types: tuple[str, ...] = ("image/",)
    allowed_cidrs: str = ""
    per_host_concurrency: int = 0      # machine-wide, all processes (udfs.download.host_slots); 0: no cap
    host_slots_dir: str | None = None  # the lock files' folder (None: one per machine in the temp dir)
    keep_alive: bool = True
    keep_alive_idle_seconds: float = 4.0   # an idle connection older than this is closed, not reused
    dns_cache_hosts: int = 4096        # per Python worker; 0: resolve every hop
    dns_cache_seconds: float = 300.0
    dns_negative_cache_seconds: float = 30.0

    @classmethod
    def from_section(cls, section: dict) -> "FetchConfig":
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in section.items() if k in known}
        for key in ("opt_out_values", "allowed_content_types"):
            if key in kwargs:
                kwargs[key] = tuple(str(v).lower() for v in (kwargs[key] or ()))
        if kwargs.get("allowed_cidrs") is None:
            kwargs["allowed_cidrs"] = ""
        return cls(**kwargs)


@dataclass
class FetchResult:
    url: str
    ok: bool = False
    status: str = "failed_to_download"   # metadata status when not ok
    error_message: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    body: bytes | None = None
    retryable: bool = False
    seconds: float = 0.0
    attempts: int = 0
    final_url: str | None = None
    retry_after: float | None = field(default=None, repr=False)
    opt_out_source: str | None = None    # x_robots_tag | tdmrep | robots_txt | opt_out_list


@dataclass
class DocumentResult:
    """A small text document (robots.txt, tdmrep.json): `error` when no complete response came."""
    url: str
    http_status: int | None = None
    body: bytes | None = None
    error: str | None = None
    # the document's own host is refused by the address guard or does not resolve: no connection
    # was made, and the image request on that host fails the same way (blocked_address / DNS)
    blocked: bool = False


class _Failure(Exception):
    def __init__(self, status: str, message: str, retryable: bool, http_status: int | None = None,
                 content_type: str | None = None, retry_after: float | None = None,
                 source: str | None = None):
        super().__init__(message)
        self.status, self.message, self.retryable = status, message, retryable
        self.http_status, self.content_type, self.retry_after = http_status, content_type, retry_after
        self.source = source


class _ResolveFailure(_Failure):
    """The host name does not resolve: nothing was connected to."""


class _ConnectionPool:
    """Idle keep-alive connections by (scheme, host, port, vetted ip); thread-safe. At most
    `per_key` idle connections per key (a shard never has more in flight to one host than its
    per-domain cap) and `total` overall; older than `idle_seconds` -> closed instead of reused."""

    def __init__(self, per_key: int, idle_seconds: float, total: int = 256, clock=time.monotonic):
        self.per_key, self.idle_seconds, self.total, self.clock = per_key, idle_seconds, total, clock
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._count = 0
        self.counts = {"opened": 0, "reused": 0, "stale_retried": 0}

    def take(self, key: tuple):
        stale = []
        conn = None
        with self._lock:
            stack = self._idle.get(key)
            now = self.clock()
            while stack:
                since, candidate = stack.pop()   # the most recently used: least likely closed
                self._count -= 1
                if now - since <= self.idle_seconds:
                    conn = candidate
                    break
                stale.append(candidate)
            if conn is not None:
                self.counts["reused"] += 1
        for c in stale:
            c.close()
        return conn

    def give(self, key: tuple, conn) -> None:
        with self._lock:
            stack = self._idle.setdefault(key, [])
            if len(stack) < self.per_key and self._count < self.total:
                stack.append((self.clock(), conn))
                self._count += 1
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._count = self._idle, {}, 0
        for stack in idle.values():
            for _, conn in stack:
                conn.close()


def _drain(resp: http.client.HTTPResponse, limit: int = _CHUNK) -> bool:
    """Read what is left of a small response body, so that its connection can carry the next
    request; False when the connection cannot be reused (closing, chunked or a large body)."""
    if resp.will_close:
        return False
    if not resp.isclosed():
        if resp.length is None or resp.length > limit:
            return False
        try:
            resp.read()
        except (OSError, http.client.HTTPException):
            return False
    return resp.isclosed()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already vetted IP; the Host header still names the host."""

    def __init__(self, host, port, ip, connect_timeout, read_timeout):
        super().__init__(host, port, timeout=connect_timeout)
        self._ip, self._read_timeout = ip, read_timeout

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock.settimeout(self._read_timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, connect_timeout, read_timeout, context):
        super().__init__(host, port, timeout=connect_timeout, context=context)
        self._ip, self._read_timeout = ip, read_timeout

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        sock.settimeout(self._read_timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def opt_out_directive(header_values: list[str], opt_out_values, agent_token: str) -> str | None:
    """The X-Robots-Tag directive that opts this image out, or None.

    Directives may be scoped to a user agent (`googlebot: noindex`); scoped directives count only
    when the scope is our agent token or `*`. Several headers and comma lists are both allowed.
    """
    wanted = {v.lower() for v in opt_out_values}
    agent = agent_token.lower()
    for raw in header_values:
        scope = None
        for part in raw.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if ":" in part:
                head, rest = (s.strip() for s in part.split(":", 1))
                if head not in wanted and head not in ("unavailable_after", "max-snippet",
                                                       "max-image-preview", "max-video-preview"):
                    scope, part = head, rest
            if scope is not None and scope not in (agent, "*"):
                continue
            if part in wanted:
                return part
    return None


class Fetcher:
    """Fetch image URLs with retries, politeness and the address guard. Thread-safe: one instance
    serves all threads of a shard (so the per-domain cap is shared between them)."""

    def __init__(self, config: FetchConfig, resolver=None, sleep=time.sleep, rng: random.Random | None = None,
                 gate=None):
        self.config = config
        # url -> None, or an object with source / message / retryable (udfs.download.robots.Decision)
        self.gate = gate
        self.guard = AddressGuard(config.allowed_cidrs, resolver)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._domain_slots: dict[str, threading.BoundedSemaphore] = {}
        self.guard.cache = worker_dns_cache(config.dns_cache_hosts, config.dns_cache_seconds,
                                            config.dns_negative_cache_seconds)
        self.host_slots = HostSlots(config.per_host_concurrency, config.host_slots_dir)
        per_key = config.per_domain_concurrency if config.per_domain_concurrency > 0 else 32
        self.pool = _ConnectionPool(per_key, config.keep_alive_idle_seconds) if config.keep_alive else None
        self._ssl = ssl.create_default_context()
        self.agent_token = (config.user_agent.split("/", 1)[0].split()[0] if config.user_agent else "").lower()

    def close(self) -> None:
        """Close the idle keep-alive connections (the fetcher stays usable)."""
        if self.pool is not None:
            self.pool.close()

    @contextmanager
    def _domain_slot(self, host: str):
        cap = self.config.per_domain_concurrency
        if not cap or cap <= 0:
            yield
            return
        with self._lock:
            slot = self._domain_slots.get(host)
            if slot is None:
                slot = self._domain_slots[host] = threading.BoundedSemaphore(cap)
        with slot:
            yield

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform(0, base * 2**attempt), capped, and never less than Retry-After."""
        cfg = self.config
        delay = self._rng.uniform(0, min(cfg.backoff_max, cfg.backoff_base * (2 ** attempt)))
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, cfg.backoff_max)

    def fetch(self, url: str) -> FetchResult:
        t0 = time.monotonic()
        attempt = 0
        while True:
            result = self._fetch_once(url)
            result.attempts = attempt + 1
            # an opt-out (an unreachable robots.txt included) is not asked again in this run
            if (not result.ok and result.retryable and result.status != "opted_out"
                    and attempt < self.config.retries):
                if result.retry_after is not None and result.retry_after > self.config.backoff_max:
                    result.error_message = (f"{result.error_message}; Retry-After {result.retry_after:.0f}s "
                                            f"exceeds backoff_max, not waiting")
                    break
                self._sleep(self.backoff(attempt, result.retry_after))
                attempt += 1
                continue
            break
        result.seconds = time.monotonic() - t0
        return result

    def _fetch_once(self, url: str) -> FetchResult:
        try:
            return self._follow(url)
        except _Failure as f:
            return FetchResult(url=url, status=f.status, error_message=f.message, retryable=f.retryable,
                               http_status=f.http_status, content_type=f.content_type,
                               retry_after=f.retry_after, opt_out_source=f.source)

    def _follow(self, url: str) -> FetchResult:
        cfg = self.config
        seen = {url}
        current = url
        deadline = time.monotonic() + cfg.total_timeout
        for _hop in range(cfg.max_redirects + 1):
            decision = self.gate(current) if self.gate is not None else None
            if decision is not None:   # before any byte is sent to this URL
                raise _Failure("opted_out", decision.message, decision.retryable, source=decision.source)
            location = self._request(current, deadline)
            if isinstance(location, FetchResult):
                location.url, location.final_url = url, current
                return location
            nxt = urljoin(current, location)
            if nxt in seen:
                raise _Failure("failed_to_download", f"redirect loop at {nxt}", False)
            seen.add(nxt)
            current = nxt
        raise _Failure("failed_to_download", f"more than {cfg.max_redirects} redirects", False)

    def fetch_document(self, url: str, max_bytes: int) -> DocumentResult:
        """GET a small document (robots.txt, tdmrep.json) with the images' guard, timeouts and
        User-Agent, following redirects; no retries, no gate, no opt-out headers, no type check.
        At most `max_bytes` of the body are read (the rest is dropped, as RFC 9309 allows)."""
        cfg = self.config
        deadline = time.monotonic() + cfg.total_timeout
        seen, current = {url}, url
        handle = self._document_handler(max_bytes)
        for hop in range(cfg.max_redirects + 1):
            try:
                got = self._request(current, deadline, handle, accept="text/plain,application/json,*/*;q=0.5")
            except _Failure as f:
                # the document's own host refused by the guard or unresolvable: so is the image
                blocked = hop == 0 and (f.status == "blocked_address" or isinstance(f, _ResolveFailure))
                return DocumentResult(url, f.http_status, None, f"{f.status}: {f.message}", blocked)
            if isinstance(got, DocumentResult):
                got.url = url
                return got
            nxt = urljoin(current, got)
            if nxt in seen:
                return DocumentResult(url, None, None, f"redirect loop at {nxt}")
            seen.add(nxt)
            current = nxt
        return DocumentResult(url, None, None, f"more than {cfg.max_redirects} redirects")

    def _document_handler(self, max_bytes: int):
        def handle(resp: http.client.HTTPResponse, deadline: float):
            code = resp.status
            if code in REDIRECT_CODES:
                location = resp.getheader("Location")
                if location:
                    return location
                return DocumentResult("", code, None, None)
            if not 200 <= code < 300:
                return DocumentResult("", code, None, None)
            chunks, total = [], 0
            while total < max_bytes:
                if time.monotonic() > deadline:
                    raise _Failure("failed_to_download", f"total timeout {self.config.total_timeout}s exceeded",
                                   True, code)
                chunk = resp.read(min(_CHUNK, max_bytes - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return DocumentResult("", code, b"".join(chunks), None)
        return handle

    def _request(self, url: str, deadline: float, handle=None, accept: str = "image/*,*/*;q=0.5"):
        """One HTTP exchange. Returns what `handle` (default: the image handler) returns: a
        FetchResult, or the Location string of a redirect."""
        cfg = self.config
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _Failure("invalid_url", f"bad url: {exc}", False) from exc
        scheme = (parts.scheme or "").lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise _Failure("invalid_url", f"not an http(s) url: {url[:200]}", False)
        host = parts.hostname
        port = port or (443 if scheme == "https" else 80)
        try:
            ip = self.guard.resolve(host, port)
        except BlockedAddress as exc:
            raise _Failure("blocked_address", f"{host}: {exc}", False) from exc
        except ResolveError as exc:
            raise _ResolveFailure("failed_to_download", str(exc), False) from exc
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {"User-Agent": cfg.user_agent, "Accept": accept, "Accept-Encoding": "identity"}
        if self.pool is None:
            headers["Connection"] = "close"
        key = (scheme, host, port, ip)   # a pooled connection goes to this vetted address only
        with self._domain_slot(host), self.host_slots.slot(host):
            conn = self.pool.take(key) if self.pool is not None else None
            reused = conn is not None
            resp = None
            keep = False
            try:
                if conn is None:
                    conn = self._connect(scheme, host, port, ip)
                try:
                    conn.request("GET", path, headers=headers)
                    resp = conn.getresponse()
                except (ConnectionError, http.client.BadStatusLine):
                    if not reused:
                        raise
                    # the server closed the idle connection before this request: once more, fresh
                    conn.close()
                    self.pool.counts["stale_retried"] += 1
                    conn = self._connect(scheme, host, port, ip)
                    conn.request("GET", path, headers=headers)
                    resp = conn.getresponse()
                try:
                    got = (handle or self._handle)(resp, deadline)
                except _Failure as f:
                    # an error status's small body is drained for reuse; opted-out, wrong-type or
                    # too-large bodies are never read: their connection is closed
                    keep = (self.pool is not None and f.status == "failed_to_download"
                            and f.http_status is not None and f.http_status != 200 and _drain(resp))
                    raise
                keep = self.pool is not None and _drain(resp)
                return got
            except _Failure:
                raise
            except (socket.timeout, TimeoutError) as exc:
                raise _Failure("failed_to_download", f"timeout: {exc or 'timed out'}", True) from exc
            except (http.client.HTTPException, OSError, ssl.SSLError) as exc:
                raise _Failure("failed_to_download", f"{type(exc).__name__}: {exc}", True) from exc
            finally:
                if conn is not None:
                    if keep:
                        self.pool.give(key, conn)
                    else:
                        conn.close()

    def _connect(self, scheme: str, host: str, port: int, ip: str) -> http.client.HTTPConnection:
        cfg = self.config
        if self.pool is not None:
            self.pool.counts["opened"] += 1
        if scheme == "https":
            return _PinnedHTTPSConnection(host, port, ip, cfg.connect_timeout, cfg.read_timeout, self._ssl)
        return _PinnedHTTPConnection(host, port, ip, cfg.connect_timeout, cfg.read_timeout)

    def _handle(self, resp: http.client.HTTPResponse, deadline: float):
        cfg = self.config
        code = resp.status
        ctype = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower() or None
        if cfg.respect_opt_out:  # headers only: the body is never read for opted-out images
            directive = opt_out_directive(resp.headers.get_all("X-Robots-Tag") or [], cfg.opt_out_values,
                                          self.agent_token)
            if directive:
                raise _Failure("opted_out", f"X-Robots-Tag: {directive}", False, code, ctype,
                               source="x_robots_tag")
        if cfg.tdmrep and (resp.getheader("tdm-reservation") or "").strip() == "1":
            raise _Failure("opted_out", "tdm-reservation: 1 (response header)", False, code, ctype,
                           source="tdmrep")
        if code in REDIRECT_CODES:
            location = resp.getheader("Location")
            if not location:
                raise _Failure("failed_to_download", f"HTTP {code} without Location", False, code, ctype)
            return location
        if code != 200:
            retry_after = parse_retry_after(resp.getheader("Retry-After"))
            raise _Failure("failed_to_download", f"HTTP {code} {resp.reason}", code in RETRYABLE_HTTP,
                           code, ctype, retry_after)
        if ctype and cfg.allowed_content_types and not any(ctype.startswith(p) for p in cfg.allowed_content_types):
            raise _Failure("bad_content_type", f"content type {ctype}", False, code, ctype)
        length = resp.getheader("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > cfg.max_image_bytes:
            raise _Failure("too_large", f"Content-Length {expected} > max_image_bytes {cfg.max_image_bytes}",
                           False, code, ctype)
        chunks, total = [], 0
        while True:
            if time.monotonic() > deadline:
                raise _Failure("failed_to_download", f"total timeout {cfg.total_timeout}s exceeded", True,
                               code, ctype)
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cfg.max_image_bytes:
                raise _Failure("too_large", f"body exceeds max_image_bytes {cfg.max_image_bytes}", False,
                               code, ctype)
        if expected is not None and total < expected:
            raise _Failure("failed_to_download", f"truncated body: {total} of {expected} bytes", True,
                           code, ctype)
        return FetchResult(url="", ok=True, status="success", http_status=code, content_type=ctype,
                           body=b"".join(chunks))
