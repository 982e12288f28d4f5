"""A threaded loopback HTTP server serving generated images, for tests, the bench and the demo.

Generic API:

    with ImageServer(latency=(0.02, 0.05), failure_rate=0.0) as srv:
        srv.add("/a.jpg", jpeg_bytes)                       # 200 image/jpeg
        srv.add("/x", b"...", content_type="text/html", status=200, headers={"X-Robots-Tag": "noai"})
        srv.add_sequence("/flaky.jpg", [Response(500), Response(200, body=...)])  # last one repeats
        srv.url("/a.jpg")                                   # http://127.0.0.1:<port>/a.jpg
        srv.requests                                        # log of (path, headers) seen
        srv.add("/robots.txt", b"...", "text/plain", host="a.test")   # only for Host: a.test
        srv.request_log()                                   # [(host, path)] in arrival order
    ImageServer(keep_alive=True)   # HTTP/1.1 persistent connections (default: HTTP/1.0, one per request)
        srv.connections_by_host()   # {host: distinct TCP connections that carried its requests}
        srv.max_in_flight()         # {host: most requests in progress at once (until the body starts)}
        srv.close_idle_connections()   # as a server's keep-alive timeout would
    srv.add_test_routes()  # the routes the download tests use (see TEST_ROUTES)
    srv.add_consent_routes()  # robots.txt / TDMRep hosts (see CONSENT_ROUTES)

Host-specific routes are looked up by the request's Host header (without the port) first, then
by path alone; tests point several host names at this one server with a stub resolver.

It binds 127.0.0.1 on an ephemeral port only. `failure_rate` turns a deterministic fraction of
paths (by a hash of the path, so every client sees the same failures) into HTTP 500s.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "image/jpeg"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0          # seconds before the status line (a slow server)
    body_delay: float = 0.0     # seconds between headers and body
    truncate_to: int | None = None   # send only this many body bytes, with the full Content-Length


# --- generated content -------------------------------------------------------------------------

def noise_image(width: int = 320, height: int = 240, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth gradient plus noise: photo-like, so a JPEG of it is well over 5 KB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     np.full_like(x, int(rng.integers(0, 256)))], axis=-1).astype(np.int16)
    noisy = np.clip(base + rng.integers(-40, 41, size=base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def jpeg_bytes(width=320, height=240, seed=0, quality=90) -> bytes:
    return encode(noise_image(width, height, seed), "JPEG", quality=quality)


def png_header_only(width: int, height: int, pad: int = 8000) -> bytes:
    """A PNG whose header claims `width` x `height` with only `pad` bytes of (random, so over the
    5 KB floor) pixel data: a decompression bomb as far as the header is concerned, cheap to serve."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", np.random.default_rng(0).integers(0, 256, pad, dtype=np.uint8).tobytes())
            + chunk(b"IEND", b""))


OPT_OUT_VALUES = ("noai", "noimageai", "noindex", "noimageindex")

# path -> expected metadata status with the test config (retries on, loopback allowed)
TEST_ROUTES = {
    "/ok.jpg": "success",
    "/ok.png": "success",
    "/ok.webp": "success",
    "/wide.jpg": "success",
    "/tiny.jpg": "too_small",
    "/missing.jpg": "failed_to_download",      # 404
    "/flaky.jpg": "success",                    # 500 then ok
    "/ratelimited.jpg": "success",              # 429 + Retry-After then ok
    "/always500.jpg": "failed_to_download",
    "/slow.jpg": "failed_to_download",          # longer than the read timeout
    "/truncated.jpg": "failed_to_download",
    "/corrupt.jpg": "failed_to_decode",
    "/huge.png": "too_large",                   # header claims 30000 x 30000
    "/page.html": "bad_content_type",
    **{f"/robots-{v}.jpg": "opted_out" for v in OPT_OUT_VALUES},
    "/robots-otherbot.jpg": "success",          # `otherbot: noai` does not address us
    "/redirect/3": "success",                   # a chain of 3 redirects to /ok.jpg
    "/redirect/9": "failed_to_download",        # more hops than max_redirects
    "/loop-a": "failed_to_download",            # a -> b -> a
}


# robots.txt of host robots.test: `*` may not fetch /members/, clipcrawl may; wildcard rules.
CONSENT_ROBOTS_TXT = b"""# clipcrawl test robots.txt
User-agent: *
Disallow: /members/
Disallow: /*.gif$
Disallow: /gallery/*/original

User-agent: clipcrawl
Allow: /members/
Disallow: /*.gif$
Disallow: /gallery/*/original
Disallow: /private/

User-agent: CCBot
Disallow: /ccbot-only/
"""
CONSENT_TDMREP_JSON = b"""[
  {"location": "/open/*", "tdm-reservation": 0},
  {"location": "/", "tdm-reservation": 1, "tdm-policy": "https://tdm.test/policy.json"}
]"""
# (host, path) -> (expected status, opt_out_source) with the default agents [clipcrawl, "*"]
CONSENT_ROUTES = {
    ("robots.test", "/members/a.jpg"): ("success", None),           # allowed for clipcrawl only
    ("robots.test", "/img/cat.gif"): ("opted_out", "robots_txt"),   # Disallow: /*.gif$
    ("robots.test", "/img/cat.gif?size=2"): ("success", None),      # $ anchors the end
    ("robots.test", "/gallery/2024/original/b.jpg"): ("opted_out", "robots_txt"),   # /gallery/*/original
    ("robots.test", "/gallery/2024/thumb/b.jpg"): ("success", None),
    ("robots.test", "/private/c.jpg"): ("opted_out", "robots_txt"),
    ("robots.test", "/ccbot-only/d.jpg"): ("success", None),        # opted out with robots_honour_ccbot
    ("robots.test", "/hop/to-private"): ("opted_out", "robots_txt"),    # 302 -> /private/c.jpg
    ("r404.test", "/private/c.jpg"): ("success", None),             # 404 robots.txt: all allowed
    ("r500.test", "/ok.jpg"): ("opted_out", "robots_txt"),          # 500: complete disallow
    ("rslow.test", "/ok.jpg"): ("opted_out", "robots_txt"),         # timed out: complete disallow
    ("tdm.test", "/open/e.jpg"): ("success", None),                 # tdmrep.json rule 0
    ("tdm.test", "/reserved/e.jpg"): ("opted_out", "tdmrep"),       # tdmrep.json rule 1
    ("r404.test", "/tdm-header.jpg"): ("opted_out", "tdmrep"),      # tdm-reservation: 1 header
    ("r404.test", "/robots-noml.jpg"): ("opted_out", "x_robots_tag"),   # X-Robots-Tag: noml
}
# image paths of CONSENT_ROUTES that robots.txt / tdmrep.json rule out: never to be requested
CONSENT_NEVER_REQUESTED = {(h, p) for (h, p), (st, src) in CONSENT_ROUTES.items()
                           if src in ("robots_txt", "tdmrep") and p not in ("/tdm-header.jpg", "/hop/to-private")}


class _Handler(BaseHTTPRequestHandler):
    server_version = "clipcrawl-test-image-server"
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):   # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        srv: ImageServer = self.server.owner  # type: ignore[attr-defined]
        self._in_flight_host = srv._enter(dict(self.headers.items()), self.client_address)
        try:
            self._get(srv)
        finally:
            self._left()

    def _left(self):
        """The request stops counting as in flight (once): before its body is sent, so that the
        interval lies inside the client's own (which ends after it read the body)."""
        host, self._in_flight_host = getattr(self, "_in_flight_host", None), None
        if host is not None:
            self.server.owner._leave(host)  # type: ignore[attr-defined]

    def _get(self, srv: "ImageServer"):
        resp = srv._respond(self.path, dict(self.headers.items()))
        if resp.delay:
            time.sleep(resp.delay)
        try:
            self.send_response(resp.status)
            if resp.content_type:
                self.send_header("Content-Type", resp.content_type)
            for name, value in resp.headers.items():
                for v in (value if isinstance(value, (list, tuple)) else [value]):
                    self.send_header(name, str(v))
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            self.wfile.flush()
            if resp.body_delay:
                time.sleep(resp.body_delay)
            body = resp.body if resp.truncate_to is None else resp.body[:resp.truncate_to]
            self._left()
            self.wfile.write(body)
            self.wfile.flush()
            srv._log_body(self.path, len(body))
        except (BrokenPipeError, ConnectionResetError):
            srv._log_body(self.path, -1)
        if resp.truncate_to is not None:
            self.close_connection = True


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.server.owner._open_connection(self.connection)  # type: ignore[attr-defined]

    def finish(self):
        self.server.owner._close_connection(self.connection)  # type: ignore[attr-defined]
        super().finish()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024   # many concurrent clients in the bench; the default (5) drops SYNs


class ImageServer:
    def __init__(self, latency: tuple[float, float] | float = 0.0, failure_rate: float = 0.0, seed: int = 0,
                 keep_alive: bool = False):
        self.keep_alive = keep_alive
        self.connection_log: list[tuple[str, tuple]] = []   # (host, client address) per request
        self._in_flight: dict[str, int] = {}
        self._max_in_flight: dict[str, int] = {}
        self._open_sockets: set = set()
        self.latency = (latency, latency) if isinstance(latency, (int, float)) else tuple(latency)
        self.failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._routes: dict[str, list[Response]] = {}
        self._served: dict[str, int] = {}
        self.requests: list[tuple[str, dict]] = []
        self.bodies_sent: list[tuple[str, int]] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> "ImageServer":
        self._httpd = _Server(("127.0.0.1", 0), _KeepAliveHandler if self.keep_alive else _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="image-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path if path.startswith('/') else '/' + path}"

    # --- routes ---
    def add(self, path: str, body: bytes, content_type: str | None = "image/jpeg", status: int = 200,
            headers: dict | None = None, host: str | None = None, **options) -> str:
        return self.add_sequence(path, [Response(status, body, content_type, dict(headers or {}), **options)],
                                 host=host)

    def add_sequence(self, path: str, responses: list[Response], host: str | None = None) -> str:
        key = path if host is None else (host.lower(), path)
        with self._lock:
            self._routes[key] = list(responses)
            self._served[key] = 0
        return path

    @staticmethod
    def _host_of(headers: dict) -> str:
        host = next((v for k, v in headers.items() if k.lower() == "host"), "") or ""
        return (host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]).lower()

    def request_log(self) -> list[tuple[str, str]]:
        """(host, path) of every request received, in order (host from the Host header)."""
        with self._lock:
            return [(self._host_of(h), p) for p, h in self.requests]

    def requested(self, host: str | None = None, path: str | None = None) -> int:
        return sum(1 for h, p in self.request_log()
                   if (host is None or h == host) and (path is None or p == path))

    def connections_by_host(self) -> dict[str, int]:
        """Distinct client connections (client address and port) that carried each host's requests."""
        with self._lock:
            seen: dict[str, set] = {}
            for host, addr in self.connection_log:
                seen.setdefault(host, set()).add(addr)
        return {h: len(a) for h, a in seen.items()}

    def max_in_flight(self) -> dict[str, int]:
        """Per host: the most requests in progress at once (from arrival until the body starts)."""
        with self._lock:
            return dict(self._max_in_flight)

    def close_idle_connections(self) -> int:
        """Shut every open keep-alive connection down (a server's idle timeout); returns how many."""
        import socket as _socket

        with self._lock:
            socks = list(self._open_sockets)
        for sock in socks:
            try:
                sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def _open_connection(self, sock) -> None:
        with self._lock:
            self._open_sockets.add(sock)

    def _close_connection(self, sock) -> None:
        with self._lock:
            self._open_sockets.discard(sock)

    def _enter(self, headers: dict, client_address) -> str:
        host = self._host_of(headers)
        with self._lock:
            self.connection_log.append((host, tuple(client_address)))
            n = self._in_flight[host] = self._in_flight.get(host, 0) + 1
            self._max_in_flight[host] = max(self._max_in_flight.get(host, 0), n)
        return host

    def _leave(self, host: str) -> None:
        with self._lock:
            self._in_flight[host] -= 1

    def request_count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for p, _ in self.requests if path is None or p == path)

    def _log_body(self, path: str, n: int) -> None:
        with self._lock:
            self.bodies_sent.append((path, n))

    def _respond(self, path: str, headers: dict) -> Response:
        lo, hi = self.latency
        if hi > 0:
            with self._lock:
                wait = self._rng.uniform(lo, hi)
            time.sleep(wait)
        with self._lock:
            self.requests.append((path, headers))
            key = (self._host_of(headers), path)
            if key not in self._routes:
                key = path
            seq = self._routes.get(key)
            if seq is None:
                return Response(404, b"not found", "text/plain")
            i = self._served[key]
            self._served[key] = i + 1
        if self.failure_rate and int(hashlib.md5(path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < self.failure_rate:
            return Response(500, b"injected failure", "text/plain")
        return seq[min(i, len(seq) - 1)]

    def add_test_routes(self, slow_seconds: float = 3.0) -> dict[str, str]:
        """Register TEST_ROUTES; returns {path: expected status}."""
        ok = jpeg_bytes(320, 240, seed=1)
        self.add("/ok.jpg", ok)
        self.add("/ok.png", encode(noise_image(200, 150, seed=2, mode="RGBA"), "PNG"), "image/png")
        self.add("/ok.webp", encode(noise_image(300, 200, seed=3), "WEBP", quality=90), "image/webp")
        self.add("/wide.jpg", jpeg_bytes(800, 200, seed=4))
        self.add("/tiny.jpg", encode(Image.new("RGB", (32, 32), (200, 10, 10)), "JPEG", quality=80))
        self.add_sequence("/flaky.jpg", [Response(500, b"oops", "text/plain"), Response(200, ok)])
        self.add_sequence("/ratelimited.jpg", [Response(429, b"slow down", "text/plain", {"Retry-After": "1"}),
                                               Response(200, ok)])
        self.add("/always500.jpg", b"broken", "text/plain", status=500)
        self.add("/slow.jpg", ok, delay=slow_seconds)
        self.add("/truncated.jpg", ok, truncate_to=len(ok) // 3)
        rng = np.random.default_rng(5)
        self.add("/corrupt.jpg", b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
        self.add("/huge.png", png_header_only(30000, 30000), "image/png")
        self.add("/page.html", b"<html><body>" + b"x" * 8000 + b"</body></html>", "text/html; charset=utf-8")
        for value in OPT_OUT_VALUES:
            # The body comes 2 s after the headers: a client that reads it is measurably slow.
            self.add(f"/robots-{value}.jpg", ok, headers={"X-Robots-Tag": value}, body_delay=2.0)
        self.add("/robots-otherbot.jpg", ok, headers={"X-Robots-Tag": "otherbot: noai"})
        for n in range(1, 10):
            target = "/ok.jpg" if n == 1 else f"/redirect/{n - 1}"
            self.add(f"/redirect/{n}", b"", None, status=302, headers={"Location": target})
        self.add("/loop-a", b"", None, status=302, headers={"Location": "/loop-b"})
        self.add("/loop-b", b"", None, status=301, headers={"Location": self.url("/loop-a")})
        return dict(TEST_ROUTES)

    def add_consent_routes(self, slow_seconds: float = 3.0) -> dict:
        """Register CONSENT_ROUTES (robots.txt per host, tdmrep.json, TDMRep and X-Robots-Tag
        headers); returns {(host, path): (expected status, opt_out_source)}. Image bodies come 2 s
        after the headers, so a client that reads an opted-out body is measurably slow."""
        ok = jpeg_bytes(320, 240, seed=11)
        for (_host, path), _ in CONSENT_ROUTES.items():
            if path not in ("/hop/to-private", "/tdm-header.jpg", "/robots-noml.jpg"):
                self.add(path, ok)
        self.add("/hop/to-private", b"", None, status=302, headers={"Location": "/private/c.jpg"})
        self.add("/tdm-header.jpg", ok, headers={"tdm-reservation": "1"}, body_delay=2.0)
        self.add("/robots-noml.jpg", ok, headers={"X-Robots-Tag": "noml"}, body_delay=2.0)
        self.add("/robots.txt", CONSENT_ROBOTS_TXT, "text/plain", host="robots.test")
        self.add("/robots.txt", b"gone", "text/plain", status=404, host="r404.test")
        self.add("/robots.txt", b"oops", "text/plain", status=500, host="r500.test")
        self.add("/robots.txt", b"User-agent: *\nAllow: /\n", "text/plain", host="rslow.test",
                 delay=slow_seconds)
        self.add("/robots.txt", b"missing", "text/plain", status=404, host="tdm.test")
        self.add("/.well-known/tdmrep.json", CONSENT_TDMREP_JSON, "application/json", host="tdm.test")
        return dict(CONSENT_ROUTES)
