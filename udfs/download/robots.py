"""robots.txt (RFC 9309) and TDMRep's `/.well-known/tdmrep.json`, checked before an image URL is
requested (every redirect hop included).

robots.txt
- fetched once per (scheme, host, port) and task, by the same fetcher as the images: address
  guard on every hop, the same timeouts and User-Agent, redirects followed (RFC 9309 asks for at
  least five), at most `download.robots_max_bytes` read (RFC 9309: at least 500 KiB);
- parsed by `protego` (a maintained RFC 9309 parser: groups merged, longest match wins, Allow wins
  a tie, `*` and `$` wildcards, percent-encoding normalised);
- the group is chosen by our own tokens in order (`download.robots_user_agents`, default
  `[clipcrawl, "*"]`): the first token with a group of exactly that name (case-insensitive) decides;
  with `download.robots_honour_ccbot`, a `User-agent: CCBot` group must allow the URL too (the
  pages came from Common Crawl; a site that turned CCBot away did not want to be in it);
- status: 2xx parsed; 4xx (but 429) = no robots.txt, everything allowed; 429, 5xx, a network
  error or a timeout = "unreachable": complete disallow for this run, the rows `retryable` so that
  a later `--retry-failed` asks again. A host refused by the address guard, or whose name does not
  resolve, decides nothing: nothing was connected to, and the image request fails the same way
  (`blocked_address`, `failed_to_download`), which keeps dead hosts out of the opt-out counts.

tdmrep.json (W3C TDMRep)
- fetched and cached like robots.txt; a JSON array of rules `{"location": pattern,
  "tdm-reservation": 0|1, "tdm-policy": url}`; the first rule whose location (robots.txt-style
  pattern: prefix, `*`, trailing `$`) matches the image path decides; `tdm-reservation: 1` opts out.
- the spec says that failing to serve a valid file means the site does not use the protocol, so
  a 4xx, 5xx, network error or invalid JSON reserves nothing (counted in the stats).

Caches: per task (`HostPolicies`, one per shard job, so one fetch per host however many threads
ask at once), and a small one per Python worker across tasks (`HostCache`, LRU of
`download.robots_cache_hosts` hosts, entries kept `download.robots_cache_seconds`).
The documents that decided a row are kept for the audit (`HostPolicies.deciding`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Decision:
    """Why a URL must not be requested."""
    source: str                 # robots_txt | tdmrep | opt_out_list
    message: str                # the matching rule, and where it came from
    retryable: bool = False     # True when the signal was unreachable (ask again in a later run)


@dataclass
class Document:
    """One fetched robots.txt / tdmrep.json, as the fetcher saw it."""
    url: str
    kind: str                   # robots_txt | tdmrep
    outcome: str                # ok | unavailable (4xx) | unreachable | blocked (guard / DNS)
    http_status: int | None = None
    body: bytes | None = None
    error: str | None = None
    fetched_at: float = field(default_factory=time.time)

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.body).hexdigest() if self.body is not None else None

    def audit(self) -> dict:
        return {"url": self.url, "kind": self.kind, "outcome": self.outcome,
                "http_status": self.http_status, "error": self.error, "sha256": self.sha256,
                "bytes": len(self.body) if self.body is not None else None,
                "fetched_at": round(self.fetched_at, 3)}


def classify(http_status: int | None, error: str | None, blocked: bool = False) -> str:
    """RFC 9309 section 2.3.1: the outcome of a robots.txt fetch (`error`: no complete response)."""
    if blocked:
        return "blocked"
    if error is not None or http_status is None:
        return "unreachable"
    if 200 <= http_status < 300:
        return "ok"
    if 400 <= http_status < 500 and http_status != 429:
        return "unavailable"
    return "unreachable"        # 429, 5xx, and anything else unexpected


# --- robots.txt ---------------------------------------------------------------------------------

class RobotsRules:
    """A parsed robots.txt and the group our tokens select."""

    def __init__(self, doc: Document, agents: tuple[str, ...], honour_ccbot: bool):
        from protego import Protego

        self.doc = doc
        text = (doc.body or b"").decode("utf-8", "replace").lstrip("\ufeff")
        parser = Protego.parse(text)
        # protego 0.7 keeps one merged rule set per lower-cased user-agent token; RFC 9309 asks
        # for an exact (case-insensitive) token match, so the group is picked here, in order.
        groups = getattr(parser, "_user_agents", {})
        self.group_name, self.group = None, None
        for token in agents:
            token = token.strip().lower()
            if token in groups:
                self.group_name, self.group = token, groups[token]
                break
        self.ccbot = groups.get("ccbot") if honour_ccbot and self.group_name != "ccbot" else None

    @staticmethod
    def _disallowing_rule(group, url: str) -> str | None:
        """The rule of `group` that disallows `url`, or None when the group allows it."""
        if group.can_fetch(url):
            return None
        from protego._utils import _quote_path  # the same normalisation can_fetch used

        path = _quote_path(url)
        for rule in group._rules:   # sorted: longest pattern first, Allow before Disallow
            if rule.value.match(path):
                return f"Disallow: {rule.value._pattern}" if rule.field == "disallow" else None
        return "Disallow"

    def decide(self, url: str) -> Decision | None:
        for name, group in ((self.group_name, self.group), ("ccbot", self.ccbot)):
            if group is None:
                continue
            rule = self._disallowing_rule(group, url)
            if rule:
                return Decision("robots_txt", f"{self.doc.url}: User-agent: {name} {rule}")
        return None


# --- tdmrep.json --------------------------------------------------------------------------------

def location_pattern(location: str) -> re.Pattern:
    """A robots.txt-style path pattern as a regex: a prefix match, `*` any run of characters, a
    trailing `$` the end of the path."""
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + (r"\Z" if anchored else ""), re.S)


class TdmRules:
    """The rules of a tdmrep.json; `invalid` when the file is not a JSON array of rules."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.rules: list[tuple[re.Pattern, dict]] = []
        self.invalid = False
        if doc.outcome != "ok":
            return
        try:
            data = json.loads((doc.body or b"").decode("utf-8", "replace").lstrip("\ufeff"))
        except ValueError:
            self.invalid = True
            return
        if not isinstance(data, list):
            self.invalid = True
            return
        for rule in data:
            if isinstance(rule, dict) and isinstance(rule.get("location"), str):
                self.rules.append((location_pattern(rule["location"]), rule))

    def decide(self, path: str) -> Decision | None:
        for pattern, rule in self.rules:
            if pattern.match(path):
                if str(rule.get("tdm-reservation")).strip() == "1":
                    shown = {k: rule[k] for k in ("location", "tdm-reservation", "tdm-policy") if k in rule}
                    return Decision("tdmrep", f"{self.doc.url}: {json.dumps(shown, sort_keys=True)}")
                return None     # the first match decides, a 0 included
        return None


# --- caches -------------------------------------------------------------------------------------

@dataclass
class HostEntry:
    robots: Document | None = None
    robots_rules: RobotsRules | None = None
    tdmrep: Document | None = None
    tdm_rules: TdmRules | None = None
    created: float = field(default_factory=time.monotonic)


class HostCache:
    """A small LRU of host entries shared by the tasks one Python worker runs."""

    def __init__(self, max_hosts: int, max_seconds: float):
        self.max_hosts, self.max_seconds = max_hosts, max_seconds
        self._items: OrderedDict[tuple, HostEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> HostEntry | None:
        if self.max_hosts <= 0:
            return None
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry.created > self.max_seconds:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: HostEntry) -> None:
        if self.max_hosts <= 0:
            return
        with self._lock:
            self._items[key] = entry
            self._items.move_to_end(key)
            while len(self._items) > self.max_hosts:
                self._items.popitem(last=False)


_WORKER_CACHES: dict[tuple, HostCache] = {}
_WORKER_LOCK = threading.Lock()


def worker_cache(max_hosts: int, max_seconds: float) -> HostCache:
    """The per-process cache for these settings (one Python worker runs many tasks in turn)."""
    key = (int(max_hosts), float(max_seconds))
    with _WORKER_LOCK:
        cache = _WORKER_CACHES.get(key)
        if cache is None:
            cache = _WORKER_CACHES[key] = HostCache(*key)
        return cache


def origin(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path?query) of an http(s) URL, else None."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    scheme = (parts.scheme or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host.lower(), port or _DEFAULT_PORTS[scheme], path


def document_url(scheme: str, host: str, port: int, path: str) -> str:
    netloc = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{path}"


@dataclass(frozen=True)
class ConsentConfig:
    robots_txt: bool = True
    tdmrep: bool = True
    agents: tuple[str, ...] = ("clipcrawl", "*")
    honour_ccbot: bool = False
    max_bytes: int = 512_000
    cache_hosts: int = 1024
    cache_seconds: float = 3600.0

    @classmethod
    def from_section(cls, section: dict) -> "ConsentConfig":
        agents = section.get("robots_user_agents", ["clipcrawl", "*"])
        if isinstance(agents, str) or not agents or not all(isinstance(a, str) and a.strip() for a in agents):
            raise ValueError(f"download.robots_user_agents must be a non-empty list of tokens, got {agents!r}")
        max_bytes = section.get("robots_max_bytes", 512_000)
        if not isinstance(max_bytes, int) or max_bytes < 512_000:
            raise ValueError("download.robots_max_bytes must be an integer >= 512000 (RFC 9309: at least "
                             f"500 KiB), got {max_bytes!r}")
        return cls(robots_txt=bool(section.get("robots_txt", True)), tdmrep=bool(section.get("tdmrep", True)),
                   agents=tuple(a.strip() for a in agents),
                   honour_ccbot=bool(section.get("robots_honour_ccbot", False)), max_bytes=max_bytes,
                   cache_hosts=int(section.get("robots_cache_hosts", 1024) or 0),
                   cache_seconds=float(section.get("robots_cache_seconds", 3600.0) or 0.0))


# fetch(url, max_bytes) -> (http_status or None, body or None, error or None, blocked: bool)
DocumentFetch = Callable[[str, int], tuple]


class HostPolicies:
    """robots.txt and tdmrep.json decisions for one task, thread-safe.

    `check(url)` fetches the host's documents on first use (one thread fetches, the others wait
    for it) and answers from memory afterwards."""

    def __init__(self, config: ConsentConfig, fetch: DocumentFetch, cache_key: str = "",
                 cache: HostCache | None = None):
        self.config = config
        self._fetch = fetch
        self._cache_key = cache_key
        self._cache = cache if cache is not None else worker_cache(config.cache_hosts, config.cache_seconds)
        self._lock = threading.Lock()
        self._entries: dict[tuple, tuple[threading.Event, HostEntry]] = {}
        self.counts: Counter = Counter()
        self.deciding: dict[str, tuple[Document, int]] = {}     # document URL -> (document, rows)

    @property
    def enabled(self) -> bool:
        return self.config.robots_txt or self.config.tdmrep

    def _load(self, scheme: str, host: str, port: int) -> HostEntry:
        key = (scheme, host, port)
        with self._lock:
            known = self._entries.get(key)
            if known is None:
                ready = threading.Event()
                self._entries[key] = (ready, HostEntry())
        if known is not None:
            known[0].wait()
            return known[1]
        entry = self._entries[key][1]
        try:
            cached = self._cache.get((self._cache_key, *key))
            if cached is not None:
                self.counts["hosts_from_worker_cache"] += 1
                entry.__dict__.update(cached.__dict__)
            else:
                try:
                    self._fill(entry, scheme, host, port)
                except Exception as exc:  # noqa: BLE001 - a bad document must not fail the task
                    url = document_url(scheme, host, port, ROBOTS_PATH)
                    entry.robots = Document(url, "robots_txt", "unreachable", None, None,
                                            f"{type(exc).__name__}: {str(exc)[:200]}")
                    entry.robots_rules = None
                    self.counts["robots_txt_errors"] += 1
                self._cache.put((self._cache_key, *key), entry)
        finally:
            self._entries[key][0].set()
        return entry

    def _get(self, kind: str, url: str) -> Document:
        status, body, error, blocked = self._fetch(url, self.config.max_bytes)
        doc = Document(url, kind, classify(status, error, blocked), status, body, error)
        self.counts[f"{kind}_fetched"] += 1
        self.counts[f"{kind}_{doc.outcome}"] += 1
        return doc

    def _fill(self, entry: HostEntry, scheme: str, host: str, port: int) -> None:
        if self.config.robots_txt:
            entry.robots = self._get("robots_txt", document_url(scheme, host, port, ROBOTS_PATH))
            if entry.robots.outcome == "ok":
                entry.robots_rules = RobotsRules(entry.robots, self.config.agents, self.config.honour_ccbot)
        if self.config.tdmrep and (entry.robots is None or entry.robots.outcome != "unreachable"):
            entry.tdmrep = self._get("tdmrep", document_url(scheme, host, port, TDMREP_PATH))
            entry.tdm_rules = TdmRules(entry.tdmrep)
            if entry.tdm_rules.invalid:
                self.counts["tdmrep_invalid"] += 1

    def _decided(self, doc: Document, decision: Decision) -> Decision:
        with self._lock:
            _, rows = self.deciding.get(doc.url, (doc, 0))
            self.deciding[doc.url] = (doc, rows + 1)
        return decision

    def check(self, url: str) -> Decision | None:
        """A Decision when `url` must not be requested, else None."""
        if not self.enabled:
            return None
        where = origin(url)
        if where is None:
            return None     # not http(s): the fetcher rejects it as invalid_url
        scheme, host, port, path = where
        if path == ROBOTS_PATH:
            return None
        entry = self._load(scheme, host, port)
        robots = entry.robots
        if robots is not None:
            if robots.outcome == "unreachable":
                why = robots.error or f"HTTP {robots.http_status}"
                return self._decided(robots, Decision(
                    "robots_txt", f"{robots.url}: unreachable ({why}): RFC 9309 complete disallow for this run",
                    retryable=True))
            if entry.robots_rules is not None:
                decision = entry.robots_rules.decide(url)
                if decision:
                    return self._decided(robots, decision)
        if entry.tdm_rules is not None:
            decision = entry.tdm_rules.decide(path)
            if decision:
                return self._decided(entry.tdmrep, decision)
        return None
