"""Address guard against server-side request forgery (SSRF).

Image URLs come from the open web. On a cloud node a URL (or a redirect) may point at the metadata
endpoint (169.254.169.254), at localhost or at an internal service. Before every connection,
including every redirect hop, the host is resolved and the connection is refused when ANY of its
addresses is loopback, private, link-local, multicast, reserved, unspecified or otherwise not
globally routable, unless it lies in one of the explicitly allowed networks
(`download.allowed_cidrs`, empty by default; tests set `127.0.0.0/8`).

The fetcher then connects to the address checked here (not to the name again), so a DNS answer
that changes between the check and the connect (DNS rebinding) cannot slip through.

The resolver is injectable: tests use a stub so that no real DNS query or connection is made.

DNS cache (`DnsCache`, one per Python worker via `worker_dns_cache`): a crawl asks for the same few
hosts millions of times, and DNS is img2dataset users' top failure (its issue #98: a flooded
resolver times out). The guard's OUTCOME per host is cached, after vetting: the address to connect
to, or the refusal. Failed lookups are cached for a shorter time (`negative_seconds`), and
concurrent lookups of one host wait for a single resolver call. The system resolver gives no TTL,
so the TTL is the configured one (`download.dns_cache_seconds`, capped well below a usual record
TTL); a cached answer is still the vetted address, so caching cannot let rebinding through.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> list of IP address strings
Resolver = Callable[[str, int], Sequence[str]]


class BlockedAddress(Exception):
    """The host resolves to an address we refuse to connect to."""


class ResolveError(Exception):
    """The host name does not resolve (DNS failure): a download failure, maybe transient."""


def parse_cidrs(spec: str | Iterable[str] | None) -> tuple[IPNetwork, ...]:
    """`"127.0.0.0/8, ::1/128"` (or a list) -> networks. Bad entries raise ValueError naming them."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    nets = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"download.allowed_cidrs: {item!r} is not a network ({exc})") from exc
    return tuple(nets)


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolveError(f"cannot resolve {host}: {exc}") from exc
    seen: list[str] = []
    for info in infos:
        addr = info[4][0].split("%", 1)[0]  # drop an IPv6 zone id
        if addr not in seen:
            seen.append(addr)
    return seen


def blocked_reason(ip: IPAddress) -> str | None:
    """Why `ip` is refused by default, or None when it is a public unicast address."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = mapped
    for attr in ("is_loopback", "is_private", "is_link_local", "is_multicast", "is_reserved",
                 "is_unspecified"):
        if getattr(ip, attr):
            return attr[3:].replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT), 192.0.0.0/24
        return "not-global"
    return None


class DnsCache:
    """Outcomes of `AddressGuard.resolve` by (guard key, host, port), with a TTL; thread-safe.

    An entry is ("ok", address) or ("error", exception) (BlockedAddress: positive TTL, it follows
    from a real answer; ResolveError: `negative_seconds`). At most `max_hosts` entries, least
    recently used evicted. `clock` is injectable for tests (a fake monotonic clock).
    """

    def __init__(self, max_hosts: int = 4096, seconds: float = 300.0, negative_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_hosts, self.seconds, self.negative_seconds = max_hosts, seconds, negative_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[float, str, object]] = OrderedDict()
        self._inflight: dict[tuple, threading.Event] = {}
        self.counts = {"hits": 0, "misses": 0, "expired": 0, "waited": 0}

    def get_or_resolve(self, key: tuple, resolve: Callable[[], str]) -> str:
        """The cached outcome for `key`, else `resolve()`'s (raised again if it raised)."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    if self.clock() < entry[0]:
                        self._entries.move_to_end(key)
                        self.counts["hits"] += 1
                        return self._replay(entry)
                    del self._entries[key]
                    self.counts["expired"] += 1
                event = self._inflight.get(key)
                if event is None:   # this thread resolves; others asking meanwhile wait for it
                    event = self._inflight[key] = threading.Event()
                    self.counts["misses"] += 1
                    break
                self.counts["waited"] += 1
            event.wait()
        try:
            try:
                value = resolve()
            except BlockedAddress as exc:
                self._put(key, self.seconds, "error", exc)
                raise
            except ResolveError as exc:
                self._put(key, self.negative_seconds, "error", exc)
                raise
            self._put(key, self.seconds, "ok", value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            event.set()

    def _put(self, key: tuple, ttl: float, kind: str, value) -> None:
        if ttl <= 0 or self.max_hosts <= 0:
            return
        with self._lock:
            self._entries[key] = (self.clock() + ttl, kind, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_hosts:
                self._entries.popitem(last=False)

    @staticmethod
    def _replay(entry):
        _, kind, value = entry
        if kind == "ok":
            return value
        raise type(value)(*value.args)

    def __len__(self) -> int:
        return len(self._entries)


_WORKER_DNS: dict[tuple, DnsCache] = {}
_WORKER_DNS_LOCK = threading.Lock()


def worker_dns_cache(max_hosts: int, seconds: float, negative_seconds: float) -> DnsCache | None:
    """The per-process cache for these settings (a Python worker runs many shard tasks in turn),
    or None when caching is off (`max_hosts` or `seconds` <= 0)."""
    if max_hosts <= 0 or seconds <= 0:
        return None
    key = (int(max_hosts), float(seconds), float(negative_seconds))
    with _WORKER_DNS_LOCK:
        cache = _WORKER_DNS.get(key)
        if cache is None:
            cache = _WORKER_DNS[key] = DnsCache(*key)
        return cache


class AddressGuard:
    """Resolve and vet a host. `allowed` networks are exempt from the default deny. With a
    `cache`, vetted outcomes are reused (keyed by this guard's resolver and allowed networks too,
    so guards with other settings sharing the cache never see each other's answers)."""

    def __init__(self, allowed_cidrs: str | Iterable[str] | None = "", resolver: Resolver | None = None,
                 cache: DnsCache | None = None):
        self.allowed = parse_cidrs(allowed_cidrs)
        self.resolver = resolver or system_resolver
        self.cache = cache

    def is_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed)

    def check_ip(self, addr: str) -> IPAddress:
        ip = ipaddress.ip_address(addr)
        if self.is_allowed(ip):
            return ip
        reason = blocked_reason(ip)
        if reason:
            raise BlockedAddress(f"address {ip} is {reason}")
        return ip

    def resolve(self, host: str, port: int) -> str:
        """Resolve `host` and return the address to connect to; raise BlockedAddress if any
        resolved address is refused (a name resolving to one public and one private address is
        refused: we cannot control which one a client would use)."""
        host = host.strip("[]")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            return str(self.check_ip(str(literal)))
        if self.cache is None:
            return self._resolve_name(host, port)
        key = (self.resolver, self.allowed, host.lower(), port)
        return self.cache.get_or_resolve(key, lambda: self._resolve_name(host, port))

    def _resolve_name(self, host: str, port: int) -> str:
        addrs = list(self.resolver(host, port))
        if not addrs:
            raise ResolveError(f"{host} resolved to no address")
        checked = [self.check_ip(a) for a in addrs]
        return str(checked[0])
