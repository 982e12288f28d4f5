"""Download stage building blocks without Spark: address guard, fetcher, resizer, shard IO, and one
shard against the loopback image server covering every status. Loopback traffic only."""

from __future__ import annotations

import io
import ipaddress
import json
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.gen.image_server import ImageServer, Response, jpeg_bytes, png_header_only
from udfs.download.address_guard import AddressGuard, BlockedAddress, blocked_reason, parse_cidrs
from udfs.download.download_worker import download_shard, make_key
from udfs.download.fetch import FetchConfig, Fetcher, opt_out_directive, parse_retry_after
from udfs.download.resize import ImageRejected, ResizeConfig, process_image
from udfs.download.shard_writer import TarShardWriter, iter_samples, sample_json

LOOPBACK = "127.0.0.0/8"


def test_config(cfg, **overrides) -> dict:
    section = cfg.section("download")
    section.update(allowed_cidrs=LOOPBACK, read_timeout=0.5, connect_timeout=1.0, retries=1,
                   backoff_base=0.01, backoff_max=2.0, thread_count=8)
    section.update(overrides)
    return section


test_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        srv.routes = srv.add_test_routes(slow_seconds=1.5)
        yield srv


# --- address guard ---------------------------------------------------------------------------

@pytest.mark.parametrize("addr,reason", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "private"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "private"), ("::1", "loopback"), ("fe80::1", "private"), ("::ffff:127.0.0.1", "loopback"),
    ("100.64.0.1", "private"), ("240.0.0.1", "private"),
])
def test_blocked_reason_refuses_non_public_addresses(addr, reason):
    # pure function: no packet is sent to any of these addresses
    got = blocked_reason(ipaddress.ip_address(addr))
    assert got is not None
    if reason == "loopback":
        assert got == "loopback"


def test_public_address_passes_and_allowlist_exempts():
    assert blocked_reason(ipaddress.ip_address("93.184.216.34")) is None
    stub = {"public.example": ["93.184.216.34"], "metadata.example": ["169.254.169.254"],
            "mixed.example": ["93.184.216.34", "10.0.0.7"], "local.example": ["127.0.0.5"]}
    guard = AddressGuard("", resolver=lambda host, port: stub[host])
    assert guard.resolve("public.example", 80) == "93.184.216.34"
    for host in ("metadata.example", "mixed.example", "local.example"):
        with pytest.raises(BlockedAddress):
            guard.resolve(host, 80)
    with pytest.raises(BlockedAddress):
        guard.resolve("127.0.0.1", 80)   # literal addresses are checked without the resolver
    allowed = AddressGuard("127.0.0.0/8, ::1/128", resolver=lambda host, port: stub[host])
    assert allowed.resolve("local.example", 80) == "127.0.0.5"
    with pytest.raises(BlockedAddress):
        allowed.resolve("metadata.example", 80)
    with pytest.raises(ValueError, match="not-a-net"):
        parse_cidrs("127.0.0.0/8,not-a-net")


def test_default_deny_sends_no_request_to_loopback(server, cfg):
    """Without download.allowed_cidrs the loopback server must see zero requests."""
    before = server.request_count()
    fetcher = Fetcher(FetchConfig.from_section(cfg.section("download")))
    assert cfg.get("download.allowed_cidrs") == ""
    for host in ("127.0.0.1", "localhost"):
        res = fetcher.fetch(server.url("/ok.jpg", host=host))
        assert res.status == "blocked_address" and not res.retryable
    assert server.request_count() == before


def test_redirect_to_blocked_address_is_refused_on_the_hop(server, cfg):
    """The first hop is allowed (stub: pub.example -> 127.0.0.1 in the allowlist); its redirect to
    a name resolving to a private address is refused before connecting."""
    server.add("/to-internal", b"", None, status=302, headers={"Location": "http://internal.example:9/x"})
    seen = []

    def resolver(host, port):
        seen.append(host)
        return {"pub.example": ["127.0.0.1"], "internal.example": ["10.0.0.5"]}[host]

    fetcher = Fetcher(FetchConfig.from_section(test_config(cfg)), resolver=resolver)
    res = fetcher.fetch(f"http://pub.example:{server.port}/to-internal")
    assert res.status == "blocked_address" and "10.0.0.5" in res.error_message
    assert seen == ["pub.example", "internal.example"]
    assert server.request_count("/to-internal") == 1


# --- fetch details -----------------------------------------------------------------------------

def test_opt_out_parsing():
    vals = ("noai", "noimageai", "noindex", "noimageindex")
    assert opt_out_directive(["noai"], vals, "clipcrawl") == "noai"
    assert opt_out_directive(["nofollow, NoImageIndex"], vals, "clipcrawl") == "noimageindex"
    assert opt_out_directive(["googlebot: noindex"], vals, "clipcrawl") is None
    assert opt_out_directive(["clipcrawl: noai"], vals, "clipcrawl") == "noai"
    assert opt_out_directive(["otherbot: noai", "noindex"], vals, "clipcrawl") == "noindex"
    assert opt_out_directive(["unavailable_after: 2030-01-01"], vals, "clipcrawl") is None


def test_retry_after_and_backoff():
    assert parse_retry_after("3") == 3.0
    assert 9 < parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) < 11
    assert parse_retry_after("soon") is None
    f = Fetcher(FetchConfig(backoff_base=1.0, backoff_max=5.0))
    delays = [f.backoff(a, None) for a in range(6) for _ in range(20)]
    assert all(0 <= d <= 5.0 for d in delays) and len(set(delays)) > 10   # jittered, capped
    assert f.backoff(0, 3.0) >= 3.0


def test_opt_out_body_is_never_read(server, cfg):
    # The server sends the body 2 s after the headers; reading it would take >= 2 s.
    fetcher = Fetcher(FetchConfig.from_section(test_config(cfg)))
    t0 = time.monotonic()
    res = fetcher.fetch(server.url("/robots-noai.jpg"))
    assert res.status == "opted_out" and res.body is None
    assert time.monotonic() - t0 < 1.5   # margin for a loaded machine, still under the 2 s body delay


def test_retry_after_is_honoured(server, cfg):
    server.add_sequence("/ra.jpg", [Response(429, b"", "text/plain", {"Retry-After": "1"}),
                                    Response(200, jpeg_bytes(seed=9))])
    sleeps = []
    fetcher = Fetcher(FetchConfig.from_section(test_config(cfg)), sleep=sleeps.append)
    res = fetcher.fetch(server.url("/ra.jpg"))
    assert res.ok and res.attempts == 2 and sleeps and sleeps[0] >= 1.0
    server.add("/ra-long.jpg", b"", "text/plain", status=503, headers={"Retry-After": "3600"})
    res = fetcher.fetch(server.url("/ra-long.jpg"))
    assert not res.ok and res.retryable and "not waiting" in res.error_message and res.attempts == 1


def test_max_bytes_and_per_domain_cap(server, cfg):
    big = jpeg_bytes(800, 600, seed=3)
    server.add("/big.jpg", big)
    small_cap = Fetcher(FetchConfig.from_section(test_config(cfg, max_image_bytes=len(big) - 1)))
    res = small_cap.fetch(server.url("/big.jpg"))
    assert res.status == "too_large" and res.body is None
    # per-domain cap: 8 threads, cap 2 -> never more than 2 requests in flight to the host
    import threading
    from concurrent.futures import ThreadPoolExecutor

    server.add("/slowish.jpg", big, delay=0.2)
    fetcher = Fetcher(FetchConfig.from_section(test_config(cfg, per_domain_concurrency=2)))
    live, peak, lock = [0], [0], threading.Lock()
    orig = fetcher._domain_slot

    def tracking(host):
        cm = orig(host)

        class _T:
            def __enter__(self):
                cm.__enter__()
                with lock:
                    live[0] += 1
                    peak[0] = max(peak[0], live[0])

            def __exit__(self, *a):
                with lock:
                    live[0] -= 1
                return cm.__exit__(*a)
        return _T()

    fetcher._domain_slot = tracking
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetcher.fetch, [server.url("/slowish.jpg")] * 8))
    assert all(r.ok for r in results) and peak[0] == 2


# --- resize ------------------------------------------------------------------------------------

def _img(w, h):
    return jpeg_bytes(w, h, seed=7)


@pytest.mark.parametrize("mode,size,expect", [
    ("border", (400, 200), (256, 256)), ("keep_ratio", (400, 200), (512, 256)),
    ("center_crop", (400, 200), (256, 256)), ("no", (400, 200), (400, 200)),
    ("keep_ratio", (100, 50), (512, 256)),
])
def test_resize_modes(mode, size, expect):
    out = process_image(_img(*size), ResizeConfig(image_size=256, resize_mode=mode))
    img = Image.open(io.BytesIO(out.data))
    assert img.size == expect == (out.width, out.height)
    assert (out.original_width, out.original_height) == size
    if mode == "border":  # black bars above and below a 2:1 image
        assert img.getpixel((128, 5)) == (0, 0, 0) or max(img.getpixel((128, 5))) < 16


def test_resize_only_if_bigger_and_formats():
    out = process_image(_img(100, 50), ResizeConfig(image_size=256, resize_mode="keep_ratio",
                                                    resize_only_if_bigger=True))
    assert (out.width, out.height) == (100, 50)
    for fmt, magic in (("png", b"\x89PNG"), ("webp", b"RIFF"), ("jpg", b"\xff\xd8")):
        assert process_image(_img(300, 300), ResizeConfig(output_format=fmt)).data.startswith(magic)
    with pytest.raises(ValueError):
        ResizeConfig(resize_mode="stretch")


def test_bomb_guard_reads_header_only():
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected) as err:   # our limit: dimensions come from the header
        process_image(png_header_only(6000, 5000), ResizeConfig(max_image_pixels=10_000_000))
    assert err.value.status == "too_large" and (err.value.width, err.value.height) == (6000, 5000)
    with pytest.raises(ImageRejected) as err:   # over twice PIL's own limit: PIL refuses at open
        process_image(png_header_only(30000, 30000), ResizeConfig())
    assert err.value.status == "too_large" and "pixels" in err.value.message
    assert time.perf_counter() - t0 < 0.5   # 930 Mpx were never decoded
    with pytest.raises(ImageRejected) as err:
        process_image(b"not an image at all", ResizeConfig())
    assert err.value.status == "failed_to_decode"


# --- shard IO ----------------------------------------------------------------------------------

def test_tar_writer_roundtrip(tmp_path):
    uri = str(tmp_path / "00003.tar")
    with TarShardWriter(uri) as w:
        w.write("000030000", {"jpg": b"a" * 10, "txt": b"hello", "json": b'{"k": 1}'})
        w.write("000030001", {"jpg": b"b" * 5, "txt": b"", "json": b"{}"})
    samples = list(iter_samples(uri))
    assert [s["__key__"] for s in samples] == ["000030000", "000030001"]
    assert samples[0]["txt"] == b"hello" and sample_json(samples[0]) == {"k": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left
    with pytest.raises(RuntimeError):
        with TarShardWriter(str(tmp_path / "00004.tar")) as w:
            w.write("x", {"txt": b"1"})
            raise RuntimeError("boom")
    assert not list(tmp_path.glob("00004*")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_shard_metadata_parquet_round_trips_without_pandas():
    """The per-shard metadata keeps every column's type and value (quotes, newlines, unicode,
    int64, exact floats, nulls, a row over 1 MiB), and building it does not pull pandas into the
    worker."""
    import subprocess
    import sys

    # The child only writes (a pq.read_table through a Python file object in a process without
    # pandas aborts at exit: apache/arrow#34314); the files are read back here.
    code = """if True:
        import json, sys
        from udfs.download.download_worker import _parquet_bytes
        rows = [{"key": "000000000", "text": 'a "b"\\n\u00e9 \u4e2d', "shard": 0, "bytes": 2**40,
                 "download_seconds": 0.1234567890123, "retryable": False, "status": "success"},
                {"key": "000000001", "status": "failed_to_download", "error_message": "x"},
                {"key": "000000002", "status": "invalid_url", "url": "data:," + "\u4e2d" * 600000}]
        print(json.dumps({"rows": _parquet_bytes(rows).hex(), "empty": _parquet_bytes([]).hex(),
                          "pandas": "pandas" in sys.modules}))"""
    child = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    table = pq.read_table(io.BytesIO(bytes.fromhex(child["rows"])))
    empty = pq.read_table(io.BytesIO(bytes.fromhex(child["empty"])))
    out = {"rows": table.to_pylist(), "names": table.schema.names, "pandas": child["pandas"],
           "types": [str(t) for t in table.schema.types], "empty": [empty.num_rows, empty.schema.names]}
    from udfs.download.download_worker import METADATA_COLUMNS

    names = [n for n, _ in METADATA_COLUMNS]
    assert out["names"] == names and out["empty"] == [0, names]
    assert out["types"][names.index("bytes")] == "int64" and out["types"][names.index("shard")] == "int32"
    first, second, huge = out["rows"]
    assert len(huge["url"]) == 600006   # a row over pyarrow's 1 MiB JSON block (1.8 MB of UTF-8)
    assert first["text"] == 'a "b"\n\u00e9 \u4e2d' and first["bytes"] == 2**40
    assert first["download_seconds"] == 0.1234567890123 and first["retryable"] is False
    assert second["error_message"] == "x" and second["bytes"] is None and second["http_status"] is None
    assert out["pandas"] is False


# --- one shard, every status -------------------------------------------------------------------

def test_shard_every_status(server, cfg, tmp_path):
    routes = server.routes
    rows = [{"key": make_key(7, i, 4), "url": server.url(path), "text": f"caption {path}", "uid": f"{i:016x}"}
            for i, path in enumerate(routes)]
    rows.append({"key": make_key(7, len(rows), 4), "url": "ftp://127.0.0.1/x.jpg", "text": "ftp", "uid": "f" * 16})
    stats = download_shard(7, rows, test_config(cfg), str(tmp_path))
    meta = pq.read_table(tmp_path / "00007.parquet").to_pylist()
    assert len(meta) == len(rows) == stats["count"]
    by_path = {m["url"].split(str(server.port), 1)[-1]: m for m in meta}
    for path, expected in routes.items():
        assert by_path[path]["status"] == expected, (path, by_path[path]["error_message"])
    assert by_path["ftp://127.0.0.1/x.jpg"]["status"] == "invalid_url"
    # retryable only for transient failures
    assert {p for p, m in by_path.items() if m["retryable"]} == {"/always500.jpg", "/slow.jpg", "/truncated.jpg"}
    assert by_path["/missing.jpg"]["http_status"] == 404
    assert by_path["/page.html"]["content_type"] == "text/html"
    assert "pixels" in by_path["/huge.png"]["error_message"]
    ok = by_path["/ok.jpg"]
    assert ok["sha256"] and ok["bytes"] > 5120 and (ok["width"], ok["height"]) == (256, 256)
    assert (ok["original_width"], ok["original_height"]) == (320, 240) and ok["download_seconds"] > 0
    # tar: exactly the successes, each with jpg/txt/json
    samples = {s["__key__"]: s for s in iter_samples(str(tmp_path / "00007.tar"))}
    assert set(samples) == {m["key"] for m in meta if m["status"] == "success"}
    for key, s in samples.items():
        assert set(s) == {"__key__", "jpg", "txt", "json"}
        assert Image.open(io.BytesIO(s["jpg"])).size == (256, 256)
        js = sample_json(s)
        assert js["key"] == key and s["txt"].decode() == js["text"] and js["status"] == "success"
    shard_stats = json.loads((tmp_path / "00007_stats.json").read_text())
    assert shard_stats["successes"] == len(samples) and shard_stats["status_dict"]["opted_out"] == 4
    assert json.loads((tmp_path / "00007_complete.json").read_text())["count"] == len(rows)


def test_malloc_tuning_works_on_glibc_and_is_skipped_without_it(monkeypatch):
    """The shard job caps malloc arenas and trims freed pages; both say whether they could."""
    import platform

    from udfs.download import download_worker as dw

    on_glibc = platform.libc_ver()[0] == "glibc"
    assert dw.limit_malloc_arenas() is on_glibc
    blocks = [bytearray(200_000) for _ in range(50)]   # freed below: something for trim to return
    del blocks
    assert dw.release_freed_memory() is on_glibc
    monkeypatch.setattr(dw, "_libc_function", lambda name: None)
    assert dw.limit_malloc_arenas() is False and dw.release_freed_memory() is False


def test_stage_counts_are_the_sum_of_the_shard_jobs_counts():
    from udfs.download.plan import summed_status_counts

    shards = [{"status_dict": {"success": 7, "opted_out": 2}, "opt_out_sources": {"robots_txt": 2},
               "retryable_failures": 0},
              {"status_dict": {"success": 5, "failed_to_download": 3}, "opt_out_sources": {},
               "retryable_failures": 2}]
    assert summed_status_counts(shards) == ({"success": 12, "opted_out": 2, "failed_to_download": 3},
                                            {"robots_txt": 2}, 2)
    assert summed_status_counts([]) == ({}, {}, 0)
