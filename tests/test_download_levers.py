"""The fetch path's speed levers, each checked on the loopback server's own logs: the per-worker
DNS cache (resolver call counts, TTL expiry on a fake clock), keep-alive reuse (TCP connections
per host, pinned to the vetted address, stale connections retried), and the machine-wide per-host
cap (requests in flight per host, across threads and processes). Loopback only: every host name
is mapped to 127.0.0.1 by a stub resolver; nothing else is resolved or connected to."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.gen.image_server import ImageServer, jpeg_bytes
from udfs.download.address_guard import AddressGuard, BlockedAddress, DnsCache, ResolveError
from udfs.download.download_worker import ShardJob
from udfs.download.fetch import FetchConfig, Fetcher
from udfs.download.host_slots import HostSlots

IMAGE = jpeg_bytes(64, 48, seed=3)
N_IMAGES = 24


class CountingResolver:
    """Maps `*.test` names to 127.0.0.1 after `delay` seconds (a slow recursive resolver), counts
    calls per host, and refuses anything else."""

    def __init__(self, delay: float = 0.0, answers: dict | None = None):
        self.delay, self.answers = delay, answers or {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, host, port):
        with self._lock:
            self.calls[host] = self.calls.get(host, 0) + 1
        if self.delay:
            time.sleep(self.delay)
        if host in self.answers:
            got = self.answers[host]
            if isinstance(got, Exception):
                raise got
            return got() if callable(got) else got
        assert host.endswith(".test"), host
        return ["127.0.0.1"]


def config(**overrides) -> FetchConfig:
    base = dict(allowed_cidrs="127.0.0.0/8", read_timeout=2.0, connect_timeout=1.0, retries=0,
                per_domain_concurrency=4, per_host_concurrency=0)
    base.update(overrides)
    return FetchConfig(**base)


@pytest.fixture()
def ka_server():
    with ImageServer(keep_alive=True) as srv:
        for i in range(N_IMAGES):
            srv.add(f"/img/{i}.jpg", IMAGE)
        srv.add("/noai.jpg", IMAGE, headers={"X-Robots-Tag": "noai"})
        srv.add("/moved", b"", status=302, headers={"Location": "/img/0.jpg"})
        yield srv


def urls(srv, host="a.test", n=N_IMAGES):
    return [f"http://{host}:{srv.port}/img/{i}.jpg" for i in range(n)]


def fetch_all(fetcher, url_list, threads=4):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fetcher.fetch, url_list))


# --- DNS cache --------------------------------------------------------------------------------

def test_dns_cache_ttl_and_negative_ttl_on_a_fake_clock():
    now = [1000.0]
    cache = DnsCache(max_hosts=10, seconds=300, negative_seconds=30, clock=lambda: now[0])
    resolver = CountingResolver(answers={"gone.test": ResolveError("NXDOMAIN gone.test")})
    guard = AddressGuard("127.0.0.0/8", resolver, cache=cache)

    assert guard.resolve("a.test", 80) == "127.0.0.1"
    now[0] += 299
    assert guard.resolve("A.test", 80) == "127.0.0.1"      # names are case-insensitive
    assert resolver.calls["a.test"] == 1
    now[0] += 2                                             # 301 s after the answer: expired
    assert guard.resolve("a.test", 80) == "127.0.0.1"
    assert resolver.calls["a.test"] == 2

    with pytest.raises(ResolveError):
        guard.resolve("gone.test", 80)
    now[0] += 29
    with pytest.raises(ResolveError, match="NXDOMAIN"):    # replayed from the cache
        guard.resolve("gone.test", 80)
    assert resolver.calls["gone.test"] == 1
    now[0] += 2                                             # the shorter negative TTL is over
    with pytest.raises(ResolveError):
        guard.resolve("gone.test", 80)
    assert resolver.calls["gone.test"] == 2


def test_dns_cache_keeps_refusals_and_is_keyed_by_the_guards_networks():
    cache = DnsCache(max_hosts=10, seconds=300, negative_seconds=30)
    resolver = CountingResolver(answers={"inside.test": ["10.0.0.9"]})
    strict = AddressGuard("127.0.0.0/8", resolver, cache=cache)
    for _ in range(3):
        with pytest.raises(BlockedAddress, match="private"):
            strict.resolve("inside.test", 80)
    assert resolver.calls["inside.test"] == 1
    # another guard that allows 10/8 shares the cache but not the refusal
    lenient = AddressGuard("10.0.0.0/8", resolver, cache=cache)
    assert lenient.resolve("inside.test", 80) == "10.0.0.9"
    assert resolver.calls["inside.test"] == 2


def test_dns_cache_evicts_least_recently_used():
    cache = DnsCache(max_hosts=2, seconds=300, negative_seconds=30)
    resolver = CountingResolver()
    guard = AddressGuard("127.0.0.0/8", resolver, cache=cache)
    for host in ("a.test", "b.test", "a.test", "c.test", "a.test", "b.test"):
        guard.resolve(host, 80)
    assert len(cache) == 2
    # b was evicted by c (a had been used more recently), so it was resolved twice; a once
    assert resolver.calls == {"a.test": 1, "b.test": 2, "c.test": 1}


def test_fetcher_resolves_each_host_once_with_the_cache(ka_server):
    resolver = CountingResolver(delay=0.05)   # 50 ms per lookup, as an uncached recursive query
    fetcher = Fetcher(config(), resolver=resolver)
    got = fetch_all(fetcher, urls(ka_server, "a.test") + urls(ka_server, "b.test"), threads=8)
    assert all(r.ok for r in got)
    # 48 requests, 8 threads asking at once at the start: one resolver call per host
    assert resolver.calls == {"a.test": 1, "b.test": 1}
    fetcher.close()

    off = CountingResolver()
    fetcher = Fetcher(config(dns_cache_hosts=0), resolver=off)
    assert all(r.ok for r in fetch_all(fetcher, urls(ka_server, "a.test")))
    assert off.calls == {"a.test": N_IMAGES}
    fetcher.close()


def test_cached_refusal_still_sends_nothing(ka_server):
    resolver = CountingResolver(answers={"meta.test": ["169.254.169.254"]})
    fetcher = Fetcher(config(), resolver=resolver)
    for _ in range(3):
        res = fetcher.fetch(f"http://meta.test:{ka_server.port}/img/0.jpg")
        assert res.status == "blocked_address"
    assert resolver.calls["meta.test"] == 1
    assert ka_server.request_count() == 0


# --- keep-alive ---------------------------------------------------------------------------------

def test_keep_alive_reuses_a_few_connections_per_host(ka_server):
    fetcher = Fetcher(config(per_domain_concurrency=4), resolver=CountingResolver())
    got = fetch_all(fetcher, urls(ka_server, "a.test") + urls(ka_server, "b.test"), threads=8)
    assert all(r.ok for r in got) and len(got) == 2 * N_IMAGES
    conns = ka_server.connections_by_host()
    # at most per_domain_concurrency connections in flight per host, each kept for the next request
    assert conns["a.test"] <= 4 and conns["b.test"] <= 4
    # a connection carries one host only: the two hosts' connections are disjoint
    by_host: dict[str, set] = {}
    for host, addr in ka_server.connection_log:
        by_host.setdefault(host, set()).add(addr)
    assert not by_host["a.test"] & by_host["b.test"]
    fetcher.close()


def test_without_keep_alive_every_request_opens_a_connection(ka_server):
    fetcher = Fetcher(config(keep_alive=False), resolver=CountingResolver())
    assert all(r.ok for r in fetch_all(fetcher, urls(ka_server, "a.test")))
    assert ka_server.connections_by_host()["a.test"] == N_IMAGES
    assert all(h.get("Connection") == "close" for _, h in ka_server.requests)


def test_pooled_connection_only_goes_to_the_address_just_vetted(ka_server):
    # the name's answer changes (as in DNS rebinding) while a connection to the old address is idle
    answers = iter([["127.0.0.1"], ["127.0.0.2"]])
    resolver = CountingResolver(answers={"flip.test": lambda: next(answers)})
    fetcher = Fetcher(config(dns_cache_hosts=0), resolver=resolver)
    first = fetcher.fetch(f"http://flip.test:{ka_server.port}/img/1.jpg")
    assert first.ok
    second = fetcher.fetch(f"http://flip.test:{ka_server.port}/img/2.jpg")
    # the server listens on 127.0.0.1 only: reaching it would mean the idle connection to the old
    # address was reused; the new address is connected to instead, and refuses
    assert not second.ok and second.status == "failed_to_download"
    assert ka_server.requested(path="/img/2.jpg") == 0
    fetcher.close()


def test_redirect_hops_and_opted_out_bodies_with_keep_alive(ka_server):
    fetcher = Fetcher(config(), resolver=CountingResolver())
    moved = fetcher.fetch(f"http://a.test:{ka_server.port}/moved")
    assert moved.ok and moved.final_url.endswith("/img/0.jpg")
    assert ka_server.connections_by_host()["a.test"] == 1   # the drained 302 carried the next hop
    # an opted-out response's body is never read, so its connection cannot be reused
    for _ in range(2):
        res = fetcher.fetch(f"http://b.test:{ka_server.port}/noai.jpg")
        assert res.status == "opted_out"
    assert ka_server.connections_by_host()["b.test"] == 2
    fetcher.close()


def test_connection_closed_by_the_server_is_retried_fresh(ka_server):
    fetcher = Fetcher(config(), resolver=CountingResolver())
    assert fetcher.fetch(f"http://a.test:{ka_server.port}/img/0.jpg").ok
    time.sleep(0.1)
    assert ka_server.close_idle_connections() == 1    # the server's idle timeout
    time.sleep(0.1)
    res = fetcher.fetch(f"http://a.test:{ka_server.port}/img/1.jpg")
    assert res.ok and res.attempts == 1               # not a retry of the row: a fresh connection
    assert fetcher.pool.counts["stale_retried"] == 1
    assert ka_server.connections_by_host()["a.test"] == 2
    fetcher.close()


def test_idle_connections_expire(ka_server):
    fetcher = Fetcher(config(keep_alive_idle_seconds=0.0), resolver=CountingResolver())
    for i in range(3):
        assert fetcher.fetch(f"http://a.test:{ka_server.port}/img/{i}.jpg").ok
        time.sleep(0.01)
    assert ka_server.connections_by_host()["a.test"] == 3
    fetcher.close()


def test_shard_with_consent_documents_over_keep_alive(ka_server, cfg, tmp_path):
    """robots.txt and tdmrep.json go through the same guard, DNS cache and connections."""
    ka_server.add("/robots.txt", b"User-agent: *\nDisallow: /img/1.jpg\n", "text/plain")
    section = cfg.section("download")
    section.update(allowed_cidrs="127.0.0.0/8", read_timeout=2.0, connect_timeout=1.0, retries=0,
                   thread_count=4, per_domain_concurrency=4, robots_cache_hosts=0, min_image_bytes=0)
    resolver = CountingResolver()
    rows = [{"key": f"{i:09d}", "url": u, "text": f"caption {i}", "page_url": None}
            for i, u in enumerate(urls(ka_server, "c.test", 12))]
    stats = ShardJob(section, str(tmp_path), resolver=resolver).run(0, rows)
    meta = {r["url"].rsplit("/", 1)[1]: r for r in pq.read_table(tmp_path / "00000.parquet").to_pylist()}
    assert meta["1.jpg"]["status"] == "opted_out" and meta["1.jpg"]["opt_out_source"] == "robots_txt"
    assert stats["successes"] == 11
    assert ka_server.requested(host="c.test", path="/robots.txt") == 1
    assert ka_server.requested(host="c.test", path="/img/1.jpg") == 0
    assert resolver.calls == {"c.test": 1}
    assert ka_server.connections_by_host()["c.test"] <= 4


# --- per-host cap shared by threads and processes ------------------------------------------------

def test_host_slots_cap_threads_of_one_process(tmp_path):
    slots = HostSlots(2, str(tmp_path))
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def work(_):
        with slots.slot("example.test"):
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            time.sleep(0.02)
            with lock:
                state["now"] -= 1
        with slots.slot("other.test"):   # another host has its own slots
            pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(24)))
    assert state["max"] == 2


def _slot_worker(port: int, slot_dir: str, cap: int, start_at: float) -> int:
    fetcher = Fetcher(config(per_domain_concurrency=4, per_host_concurrency=cap, host_slots_dir=slot_dir,
                             read_timeout=5.0), resolver=CountingResolver())
    time.sleep(max(0.0, start_at - time.time()))   # both processes start fetching together
    got = fetch_all(fetcher, [f"http://a.test:{port}/img/{i}.jpg" for i in range(16)], threads=4)
    fetcher.close()
    return sum(r.ok for r in got)


def _two_processes(srv, slot_dir, cap) -> int:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        return sum(pool.starmap(_slot_worker, [(srv.port, slot_dir, cap, time.time() + 4.0)] * 2))


def test_per_host_cap_holds_across_processes(tmp_path):
    with ImageServer(latency=0.05) as srv:
        for i in range(16):
            srv.add(f"/img/{i}.jpg", IMAGE)
        # each process alone could have 4 in flight (its per-domain cap), and a per-process cap of 3
        # would still let 6 through: 3 at most means the slots are shared by the two processes
        assert _two_processes(srv, str(tmp_path / "capped"), 3) == 32
        assert srv.max_in_flight()["a.test"] == 3
    with ImageServer(latency=0.05) as srv:   # the same load without the cap: the test can tell
        for i in range(16):
            srv.add(f"/img/{i}.jpg", IMAGE)
        assert _two_processes(srv, str(tmp_path / "uncapped"), 0) == 32
        assert srv.max_in_flight()["a.test"] > 4   # both processes were in flight at once


# --- JVM class-data-sharing archive (spark.class_archive) ------------------------------------------

def test_class_archive_options_dump_first_then_map(tmp_path):
    from spark_jobs.session import class_archive, class_archive_options

    assert class_archive(None) is None and class_archive_options(None) == ("", None)
    auto = class_archive("auto")
    assert auto.endswith(".jsa") and str(os.getuid()) in auto
    assert class_archive("auto") == auto          # stable for one pyspark + java

    path = str(tmp_path / "cds" / "spark.jsa")
    options, dump = class_archive_options(path)   # none yet: this run dumps into a file of its own
    assert f"-XX:ArchiveClassesAtExit={dump}" in options
    assert dump != path and dump.startswith(path) and (tmp_path / "cds").is_dir()
    Path(path).write_bytes(b"archive")            # (as promote_class_archive leaves it)
    options, dump = class_archive_options(path)
    assert f"-XX:SharedArchiveFile={path}" in options and dump is None
    Path(path).write_bytes(b"")                   # an empty file is not an archive: dump again
    assert class_archive_options(path)[1] is not None


def test_class_archive_dump_is_moved_into_place_after_the_jvm_exits(tmp_path, monkeypatch):
    """promote_class_archive with a stand-in for the gateway JVM: EOF on its stdin makes it write
    its dump and exit, as pyspark's gateway does; only then is the dump renamed to the archive."""
    import subprocess

    from pyspark import SparkContext

    from spark_jobs.session import promote_class_archive

    path, dump = tmp_path / "spark.jsa", tmp_path / "spark.jsa.123.tmp"
    jvm = subprocess.Popen(["sh", "-c", f"cat >/dev/null; sleep 0.2; printf archive > {dump}"],
                           stdin=subprocess.PIPE)

    class Gateway:
        proc = jvm

    monkeypatch.setattr(SparkContext, "_gateway", Gateway, raising=False)
    monkeypatch.setattr(SparkContext, "_active_spark_context", None, raising=False)
    assert not path.exists()
    assert promote_class_archive(str(dump), str(path), timeout=10)
    assert path.read_bytes() == b"archive" and not dump.exists()

    failed = subprocess.Popen(["sh", "-c", f"cat >/dev/null; printf half > {dump}; exit 1"], stdin=subprocess.PIPE)
    Gateway.proc = failed
    path.unlink()
    assert not promote_class_archive(str(dump), str(path), timeout=10)   # a JVM that failed: dump dropped
    assert not path.exists() and not dump.exists()


def test_one_dump_at_a_time_and_stale_dumps_removed(tmp_path):
    from spark_jobs.session import DUMP_WAIT_SECONDS, class_archive_options

    path = tmp_path / "spark.jsa"
    other = tmp_path / "spark.jsa.999.tmp"
    other.write_bytes(b"being written")
    assert class_archive_options(str(path)) == ("", None)        # another process is dumping
    old = time.time() - DUMP_WAIT_SECONDS - 5
    os.utime(other, (old, old))                                  # ... and died long ago
    options, dump = class_archive_options(str(path))
    assert dump is not None and "ArchiveClassesAtExit" in options and not other.exists()


# --- decode slots: how many fetch threads decode at once ------------------------------------------

@pytest.mark.parametrize("slots", [2, 0])
def test_decode_concurrency_caps_threads_decoding_at_once(ka_server, cfg, tmp_path, monkeypatch, slots):
    """8 fetch threads, each image's processing held for 100 ms: with decode_concurrency=2 at most
    2 are inside process_image at once, with 0 (no cap) more get in; every image is still written
    either way."""
    import udfs.download.download_worker as dw

    inside, peak, lock = [0], [0], threading.Lock()
    real = dw.process_image

    def slow_process(body, resize_cfg):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            time.sleep(0.1)
            return real(body, resize_cfg)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(dw, "process_image", slow_process)
    section = cfg.section("download")
    section.update(allowed_cidrs="127.0.0.0/8", read_timeout=2.0, connect_timeout=1.0, retries=0,
                   thread_count=8, per_domain_concurrency=8, robots_txt=False, tdmrep=False,
                   min_image_bytes=0, decode_concurrency=slots)
    rows = [{"key": f"{i:09d}", "url": u, "text": f"caption {i}", "page_url": None}
            for i, u in enumerate(urls(ka_server, "d.test"))]
    stats = ShardJob(section, str(tmp_path), resolver=CountingResolver()).run(0, rows)
    assert stats["successes"] == N_IMAGES
    assert peak[0] == 2 if slots else peak[0] > 2
    assert ("decode_wait" in stats["seconds"]) == bool(slots)


def test_decode_concurrency_must_be_a_count(cfg):
    from udfs.download.settings import check_section

    section = cfg.section("download")
    section["decode_concurrency"] = -1
    with pytest.raises(ValueError, match="decode_concurrency"):
        check_section(section)


# --- the shard's window of rows in flight ----------------------------------------------------------

def test_fetch_window_keeps_twice_the_threads_in_flight_and_records_every_row(cfg, tmp_path, monkeypatch):
    """Finished rows reach the shard's thread through a queue: with 4 threads at most 8 rows are
    submitted and unfinished at once, every one of 50 rows gets its record, and a row whose
    processing raises fails the shard (as a task error) instead of being lost."""
    section = cfg.section("download")
    section.update(thread_count=4, robots_txt=False, tdmrep=False)
    job = ShardJob(section, str(tmp_path), resolver=CountingResolver())
    started, finished, peak, lock = [0], [0], [0], threading.Lock()

    def fake_row(row, shard):
        with lock:
            started[0] += 1
            peak[0] = max(peak[0], started[0] - finished[0])
        time.sleep(0.002 * (hash(row["key"]) % 5))   # out-of-order completions
        rec = {"key": row["key"], "status": "failed_to_download", "error_message": "test"}
        with lock:
            finished[0] += 1
        if row["key"] == "boom":
            raise RuntimeError("row failed")
        return rec, None, {"network": 0.001}

    monkeypatch.setattr(job, "process_row", fake_row)
    rows = [{"key": f"{i:09d}", "url": f"http://127.0.0.1:1/{i}.jpg", "text": "t"} for i in range(50)]
    records, totals = [], {}
    job._fetch_all(0, rows, writer=None, records=records, totals=totals)
    assert sorted(r["key"] for r in records) == [r["key"] for r in rows]
    assert 4 <= peak[0] <= 8
    assert totals["network"] == pytest.approx(0.05)
    with pytest.raises(RuntimeError, match="row failed"):
        job._fetch_all(0, [*rows[:5], {"key": "boom", "url": "x", "text": "t"}], None, [], {})
