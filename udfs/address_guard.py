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
"""

from __future__ import annotations

import ipaddress
import socket
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


class AddressGuard:
    """Resolve and vet a host. `allowed` networks are exempt from the default deny."""

    def __init__(self, allowed_cidrs: str | Iterable[str] | None = "", resolver: Resolver | None = None):
        self.allowed = parse_cidrs(allowed_cidrs)
        self.resolver = resolver or system_resolver

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
        addrs = [str(literal)] if literal is not None else list(self.resolver(host, port))
        if not addrs:
            raise ResolveError(f"{host} resolved to no address")
        checked = [self.check_ip(a) for a in addrs]
        return str(checked[0])
