"""HTTP front of the kNN service: stdlib ThreadingHTTPServer, JSON in and out, one web page.

Routes (clip-retrieval's names where they exist):
    GET  /                 the search page (serving/static/index.html); its state is in the
                           query string (/?q=a+red+circle&subset=laion2B-en&k=40), so a search is a link
    GET  /indices-list     ["laion2B-en", ...]
    GET  /info             sizes, index types, recall and limits of the served subsets
    POST /knn-service      a query (see serving.service) -> [{id, url, caption, similarity, ...}]
    POST /metadata         {ids, indice_name} -> [{id, metadata}]
    GET  /thumbnail?indice_name=..&id=..   the image bytes, read from its tar shard
    GET  /embedding?indice_name=..&id=..   a row's stored CLIP vector (the page's "search similar")
    GET  /health           {"ok": true}
Errors are JSON `{"error": message}` with a 4xx (client) or 503 (model unavailable) status; an
unexpected exception is logged and answered with a 500, and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

from serving.service import ApiError, KnnService

log = logging.getLogger(__name__)


def page_html() -> bytes:
    return resources.files("serving").joinpath("static/index.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    server_version = "clipcrawl-serve/0.1"
    service: KnnService  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK hold the body
    # ~40 ms on keep-alive connections (measured: 1M-vector p50 100 ms vs a 37 ms search)
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # route the access log through logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- responses ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")  # clip-retrieval's front end is elsewhere
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False, default=_json_default).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _guard(self, fn) -> None:
        try:
            fn()
        except ApiError as exc:
            self._error(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 - one bad request must never stop the server
            log.exception("error answering %s %s", self.command, self.path)
            self._error(500, "internal error (logged on the server)")

    # -- request bodies ----------------------------------------------------------------------
    def _body_json(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        # base64 makes an image 4/3 larger; allow that plus room for the other fields.
        limit = int(self.service.cfg["max_upload_bytes"]) * 4 // 3 + 65536
        if n < 0 or n > limit:
            self.close_connection = True
            raise ApiError(413, f"request body larger than {limit} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    # -- routes ------------------------------------------------------------------------------
    def do_OPTIONS(self):  # CORS preflight of browsers talking JSON to us
        self._send(204, b"", "text/plain", {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                            "Access-Control-Allow-Headers": "Content-Type"})

    def do_GET(self):
        self._guard(self._get)

    def do_HEAD(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            self._send(200, page_html(), "text/html; charset=utf-8")
        elif url.path == "/indices-list":
            self._json(200, self.service.indices_list())
        elif url.path == "/info":
            self._json(200, self.service.describe())
        elif url.path == "/health":
            self._json(200, {"ok": True})
        elif url.path == "/thumbnail":
            q = parse_qs(url.query)
            data, ctype = self.service.thumbnail((q.get("indice_name") or [None])[0],
                                                 (q.get("id") or [None])[0])
            self._send(200, data, ctype, {"Cache-Control": "max-age=3600"})
        elif url.path == "/embedding":
            q = parse_qs(url.query)
            self._json(200, self.service.embedding((q.get("indice_name") or [None])[0],
                                                   (q.get("id") or [None])[0],
                                                   (q.get("modality") or ["image"])[0]))
        else:
            raise ApiError(404, f"no route GET {url.path}")

    def _post(self):
        path = urlparse(self.path).path
        if path == "/knn-service":
            self._json(200, self.service.knn(self._body_json()))
        elif path == "/metadata":
            self._json(200, self.service.metadata(self._body_json()))
        else:
            raise ApiError(404, f"no route POST {path}")


def _json_default(obj):
    try:
        return obj.item()  # numpy scalars
    except AttributeError:
        return str(obj)


def make_server(service: KnnService, host: str, port: int) -> ThreadingHTTPServer:
    """A ready server (port 0 picks a free port: `server.server_address[1]`)."""
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
