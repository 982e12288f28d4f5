"""Consent before any image byte is requested: robots.txt (RFC 9309), TDMRep (tdmrep.json and the
tdm-reservation header), X-Robots-Tag noml, opt-out lists, page-level meta opt-outs and the
sha256 content blocklist. Loopback only: host names are pointed at 127.0.0.1 by a stub resolver,
and the test server answers per Host header. What was requested is read from the server's own
request log."""

from __future__ import annotations

import hashlib
import json
import tempfile
import urllib.robotparser
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.gen.image_server import (
    CONSENT_NEVER_REQUESTED,
    CONSENT_ROBOTS_TXT,
    CONSENT_ROUTES,
    ImageServer,
    jpeg_bytes,
)
from udfs.download.download_worker import ShardJob
from udfs.download.opt_out import OptOutList, Sha256Blocklist
from udfs.download.robots import (
    ROBOTS_PATH,
    TDMREP_PATH,
    ConsentConfig,
    Document,
    HostCache,
    HostPolicies,
    RobotsRules,
    TdmRules,
    classify,
)
from udfs.download.shard_writer import iter_samples
from udfs.extract import page_opt_out

TEST_HOSTS = ("robots.test", "r404.test", "r500.test", "rslow.test", "tdm.test", "list.test",
              "sub.list.test", "notlist.test")


def stub_resolver(host, port):
    # every test host is this machine; anything else must not be resolved at all
    assert host in TEST_HOSTS or host == "127.0.0.1", host
    return ["127.0.0.1"]


def section_for(cfg, **overrides) -> dict:
    section = cfg.section("download")
    section.update(allowed_cidrs="127.0.0.0/8", read_timeout=0.5, connect_timeout=1.0, retries=1,
                   backoff_base=0.01, backoff_max=2.0, thread_count=8, robots_cache_hosts=0)
    section.update(overrides)
    return section


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        srv.add_test_routes(slow_seconds=1.5)
        srv.consent = srv.add_consent_routes(slow_seconds=1.5)
        yield srv


def rows_for(server, items) -> list[dict]:
    return [{"key": f"{i:09d}", "url": f"http://{host}:{server.port}{path}", "text": f"caption {i}",
             "page_url": f"http://{host}/page.html"} for i, (host, path) in enumerate(items)]


def run_shard(section, out, rows, shard=0):
    job = ShardJob(section, str(out), resolver=stub_resolver)
    stats = job.run(shard, rows)
    return stats, pq.read_table(Path(out) / f"{shard:05d}.parquet").to_pylist()


def by_route(server, meta) -> dict:
    """{(host, path): metadata row}."""
    out = {}
    for r in meta:
        rest = r["url"].split("://", 1)[1]
        host, tail = rest.split(":", 1)
        out[(host, tail[len(str(server.port)):])] = r
    return out


# --- pure rules ---------------------------------------------------------------------------------

def test_page_meta_rules():
    reason = page_opt_out.reason
    assert reason([("robots", "noai, noimageai")]) == "robots=noai"
    assert reason([("ROBOTS", "index, follow, NoImageAI")]) == "robots=noimageai"
    assert reason([("robots", "noml")]) == "robots=noml"
    assert reason([("tdm-reservation", "1")]) == "tdm-reservation=1"
    assert reason([("tdm-reservation", "0")]) is None
    assert reason([("robots", "noindex, nofollow")]) is None      # search-engine directives only
    assert reason([("googlebot", "noai")]) is None                # addressed to another robot
    assert reason([("clipcrawl", "noai")]) == "clipcrawl=noai"
    assert reason([("description", "noai art"), ("viewport", None)]) is None
    head = {"Title": "t", "Metas": [{"name": "viewport", "content": "width=device-width"},
                                    {"property": "og:title", "content": "noai"},
                                    {"name": "robots", "content": "noimageai"}]}
    assert page_opt_out.from_wat_head(head) == "robots=noimageai"
    assert page_opt_out.from_wat_head({"Metas": "not-a-list"}) is None
    assert page_opt_out.from_wat_head(None) is None
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser('<html><head><meta name="tdm-reservation" content="1"></head></html>')
    assert page_opt_out.from_html_tree(tree) == "tdm-reservation=1"
    assert page_opt_out.from_html_tree(LexborHTMLParser("<p>no head</p>")) is None


def test_opt_out_list_domains_prefixes_and_bad_lines(tmp_path):
    path = tmp_path / "optout.txt"
    path.write_text("# publishers that opted out\nexample.com\n*.wild.org\nhttps://Photos.Example.net/gallery/\n"
                    "\nnot a domain!\nftp://x.org/\n")
    lst = OptOutList.load(str(path))
    assert lst.invalid_lines == 2 and len(lst) == 3
    assert lst.match("http://example.com/a.jpg") == "domain example.com"
    assert lst.match("https://cdn.img.EXAMPLE.com/a.jpg") == "domain example.com"
    assert lst.match("https://notexample.com/a.jpg") is None
    assert lst.match("http://a.wild.org/x.png") == "domain wild.org"
    assert lst.match("https://photos.example.net/gallery/1.jpg") == "prefix https://photos.example.net/gallery/"
    assert lst.match("https://photos.example.net:443/gallery/1.jpg") is not None   # default port
    assert lst.match("http://photos.example.net/gallery/1.jpg") is None              # other scheme
    assert lst.match("https://photos.example.net/other/1.jpg") is None


def test_sha256_blocklist_parsing(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    path = tmp_path / "blocked.txt"
    path.write_text(f"{digest.upper()}\nnot-hex\n{'0' * 63}\n")
    blocked = Sha256Blocklist.load(str(path))
    assert digest in blocked and len(blocked) == 1 and blocked.invalid_lines == 2


@pytest.mark.parametrize("status,error,outcome", [
    (200, None, "ok"), (204, None, "ok"), (404, None, "unavailable"), (403, None, "unavailable"),
    (410, None, "unavailable"), (429, None, "unreachable"), (500, None, "unreachable"),
    (503, None, "unreachable"), (None, "timeout: timed out", "unreachable"),
    (None, "failed_to_download: ConnectionRefusedError", "unreachable"),
])
def test_robots_status_follows_rfc9309(status, error, outcome):
    assert classify(status, error) == outcome


def _doc(body: bytes, kind="robots_txt") -> Document:
    return Document("http://h/robots.txt", kind, "ok", 200, body)


def test_group_selection_in_token_order_and_ccbot():
    mine = RobotsRules(_doc(CONSENT_ROBOTS_TXT), ("clipcrawl", "*"), honour_ccbot=False)
    assert mine.group_name == "clipcrawl"
    assert mine.decide("http://h/members/a.jpg") is None
    d = mine.decide("http://h/private/c.jpg")
    assert d.source == "robots_txt" and d.message == "http://h/robots.txt: User-agent: clipcrawl Disallow: /private/"
    other = RobotsRules(_doc(CONSENT_ROBOTS_TXT), ("otherbot", "*"), honour_ccbot=False)
    assert other.group_name == "*"
    assert "Disallow: /members/" in other.decide("http://h/members/a.jpg").message
    assert mine.decide("http://h/ccbot-only/d.jpg") is None
    ccbot = RobotsRules(_doc(CONSENT_ROBOTS_TXT), ("clipcrawl", "*"), honour_ccbot=True)
    assert ccbot.decide("http://h/ccbot-only/d.jpg").message.endswith("User-agent: ccbot Disallow: /ccbot-only/")
    # no group for our tokens and no `*` group: everything allowed
    none = RobotsRules(_doc(b"User-agent: somebot\nDisallow: /\n"), ("clipcrawl", "*"), False)
    assert none.group is None and none.decide("http://h/x.jpg") is None
    # groups of one token are merged; longest match wins; Allow wins a tie (RFC 9309 2.2.2)
    merged = RobotsRules(_doc(b"User-agent: clipcrawl\nDisallow: /a\n\nUser-agent: x\nDisallow: /\n\n"
                              b"User-agent: CLIPCRAWL\nAllow: /a/b\nDisallow: /c\nAllow: /c\n"), ("clipcrawl",), False)
    assert merged.decide("http://h/a/b/1.jpg") is None
    assert merged.decide("http://h/a/z.jpg") is not None
    assert merged.decide("http://h/c/1.jpg") is None


# RFC 9309 section 2.2.3 / Google's documented wildcard examples: (rules, path, allowed), stated by
# hand from the spec, not taken from either parser.
WILDCARD_CASES = [
    ("Disallow: /*.gif$", "/img/cat.gif", False),
    ("Disallow: /*.gif$", "/img/cat.gif?size=2", True),
    ("Disallow: /*.gif$", "/img/cat.GIF", True),             # paths are case-sensitive
    ("Disallow: /gallery/*/original", "/gallery/2024/original/b.jpg", False),
    ("Disallow: /gallery/*/original", "/gallery/original", True),
    ("Disallow: /*?", "/photo.jpg?w=200", False),
    ("Disallow: /*?", "/photo.jpg", True),
    ("Disallow: /fish*", "/fish.php", False),
    ("Disallow: /fish$", "/fish", False),
    ("Disallow: /fish$", "/fishheads", True),
    ("Disallow: /\nAllow: /$", "/", True),
    ("Disallow: /\nAllow: /$", "/page.jpg", False),
    ("Disallow: /*.jpg\nAllow: /public/*.jpg", "/public/a.jpg", True),   # longer match wins
    ("Disallow: /private\nAllow: /private", "/private/a.jpg", True),      # tie: Allow
]


def test_protego_against_urllib_robotparser_on_wildcards():
    """The measurement the issue asks for: protego gets every wildcard case right; the standard
    library's parser, which predates RFC 9309, does not (it matches `*` and `$` literally and
    takes the first matching rule instead of the longest)."""
    from protego import Protego

    protego_wrong, urllib_wrong = [], []
    for rules, path, allowed in WILDCARD_CASES:
        text = "User-agent: *\n" + rules + "\n"
        if Protego.parse(text).can_fetch("http://h" + path, "clipcrawl") != allowed:
            protego_wrong.append((rules, path))
        rp = urllib.robotparser.RobotFileParser()
        rp.parse(text.splitlines())
        if rp.can_fetch("clipcrawl", "http://h" + path) != allowed:
            urllib_wrong.append((rules, path))
    assert protego_wrong == []
    assert len(urllib_wrong) >= 5, urllib_wrong      # e.g. /*.gif$ does not block /img/cat.gif


def test_tdmrep_first_matching_rule_decides():
    body = json.dumps([{"location": "/open/*", "tdm-reservation": 0},
                       {"location": "/*.png$", "tdm-reservation": 1},
                       {"location": "/", "tdm-reservation": 1, "tdm-policy": "https://p/policy.json"}]).encode()
    rules = TdmRules(_doc(body, "tdmrep"))
    assert rules.decide("/open/a.png") is None          # rule 0 comes first
    assert '"location": "/*.png$"' in rules.decide("/x/a.png").message
    d = rules.decide("/x/a.jpg")
    assert d.source == "tdmrep" and '"tdm-policy": "https://p/policy.json"' in d.message
    for bad in (b"not json", b'{"location": "/"}'):
        invalid = TdmRules(_doc(bad, "tdmrep"))
        assert invalid.invalid and invalid.decide("/x.jpg") is None
    absent = TdmRules(Document("http://h" + TDMREP_PATH, "tdmrep", "unavailable", 404))
    assert not absent.invalid and absent.decide("/x.jpg") is None


def test_config_validation():
    with pytest.raises(ValueError, match="robots_user_agents"):
        ConsentConfig.from_section({"robots_user_agents": "clipcrawl"})
    with pytest.raises(ValueError, match="robots_max_bytes"):
        ConsentConfig.from_section({"robots_max_bytes": 1000})
    assert ConsentConfig.from_section({}).agents == ("clipcrawl", "*")


def test_one_fetch_per_host_however_many_threads_ask():
    """32 threads ask about one host at once: the document fetch runs once."""
    import threading

    calls = Counter()

    def fetch(url, max_bytes):
        calls[url] += 1
        threading.Event().wait(0.05)
        return 200, b"User-agent: *\nDisallow: /no/\n", None, False

    policies = HostPolicies(ConsentConfig(tdmrep=True), fetch, cache=HostCache(0, 0))
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(policies.check(f"http://h.test/no/{i}.jpg")))
               for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"http://h.test/robots.txt": 1, "http://h.test/.well-known/tdmrep.json": 1}
    assert len(results) == 32 and all(r is not None and r.source == "robots_txt" for r in results)
    assert policies.deciding["http://h.test/robots.txt"][1] == 32


# --- one shard against the test server ----------------------------------------------------------

def test_shard_honours_every_signal_and_never_requests_what_is_ruled_out(server, cfg, tmp_path):
    before = len(server.request_log())
    items = list(CONSENT_ROUTES) * 2          # each image twice: robots.txt must still come once
    stats = ShardJob(section_for(cfg), str(tmp_path), resolver=stub_resolver).run(0, rows_for(server, items))
    meta = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    got = by_route(server, meta)
    assert {k: (r["status"], r["opt_out_source"]) for k, r in got.items()} == CONSENT_ROUTES
    log = server.request_log()[before:]
    # the server never saw a request for a URL that robots.txt or tdmrep.json rules out
    assert not set(log) & CONSENT_NEVER_REQUESTED, set(log) & CONSENT_NEVER_REQUESTED
    hosts = {h for h, _ in CONSENT_ROUTES}
    counts = Counter(log)
    for host in hosts:
        assert counts[(host, ROBOTS_PATH)] == 1, host          # once per host in this task
    # tdmrep.json once per host whose robots.txt was reachable
    for host in hosts - {"r500.test", "rslow.test"}:
        assert counts[(host, TDMREP_PATH)] == 1, host
    assert counts[("r500.test", TDMREP_PATH)] == counts[("rslow.test", TDMREP_PATH)] == 0
    # the rule that decided, and retryable only where robots.txt was unreachable
    assert got[("robots.test", "/img/cat.gif")]["error_message"].endswith("User-agent: clipcrawl Disallow: /*.gif$")
    assert "tdm-reservation" in got[("tdm.test", "/reserved/e.jpg")]["error_message"]
    assert got[("r404.test", "/tdm-header.jpg")]["error_message"].startswith("tdm-reservation: 1")
    assert got[("r404.test", "/robots-noml.jpg")]["error_message"] == "X-Robots-Tag: noml"
    assert "unreachable (HTTP 500)" in got[("r500.test", "/ok.jpg")]["error_message"]
    assert "timeout" in got[("rslow.test", "/ok.jpg")]["error_message"]
    retryable = {k for k, r in got.items() if r["retryable"]}
    assert retryable == {("r500.test", "/ok.jpg"), ("rslow.test", "/ok.jpg")}
    # headers-only opt-outs: decided without waiting for the 2 s body
    for key in (("r404.test", "/tdm-header.jpg"), ("r404.test", "/robots-noml.jpg")):
        assert got[key]["download_seconds"] < 1.5
    # stats per source (each route twice)
    want = Counter(src for (st, src) in CONSENT_ROUTES.values() if st == "opted_out")
    assert stats["opt_out_sources"] == {k: 2 * v for k, v in want.items()}
    assert stats["consent"]["robots_txt_fetched"] == len(hosts)
    assert stats["consent"]["robots_txt_unreachable"] == 2
    # the audit: the documents that decided, with their bodies
    audit = json.loads((tmp_path / "_stats" / "robots" / "00000.json").read_text())
    decided = {(a["url"].split("//", 1)[1].split(":", 1)[0], a["kind"]): a for a in audit}
    assert set(decided) == {("robots.test", "robots_txt"), ("r500.test", "robots_txt"),
                            ("rslow.test", "robots_txt"), ("tdm.test", "tdmrep")}
    robots = decided[("robots.test", "robots_txt")]
    body = (tmp_path / "_stats" / "robots" / robots["body_file"]).read_bytes()
    assert body == CONSENT_ROBOTS_TXT and robots["sha256"] == hashlib.sha256(body).hexdigest()
    assert robots["rows_decided"] == 2 * 4      # cat.gif, original, private, hop -> private
    assert decided[("r500.test", "robots_txt")]["http_status"] == 500


def test_agent_tokens_and_ccbot_option_change_the_decision(server, cfg, tmp_path):
    items = [("robots.test", "/members/a.jpg"), ("robots.test", "/ccbot-only/d.jpg")]
    _, meta = run_shard(section_for(cfg, robots_user_agents=["otherbot", "*"], robots_honour_ccbot=True),
                           tmp_path, rows_for(server, items))
    got = by_route(server, meta)
    assert got[items[0]]["status"] == "opted_out" and "User-agent: * Disallow: /members/" in got[items[0]]["error_message"]
    assert got[items[1]]["status"] == "opted_out" and "User-agent: ccbot" in got[items[1]]["error_message"]


def test_robots_off_fetches_and_never_asks(server, cfg, tmp_path):
    before = len(server.request_log())
    items = [("robots.test", "/private/c.jpg"), ("tdm.test", "/reserved/e.jpg")]
    _, meta = run_shard(section_for(cfg, robots_txt=False, tdmrep=False), tmp_path, rows_for(server, items))
    assert [r["status"] for r in meta] == ["success", "success"]
    paths = {p for _, p in server.request_log()[before:]}
    assert ROBOTS_PATH not in paths and TDMREP_PATH not in paths


def test_worker_cache_spares_the_second_task_and_off_means_once_per_task(server, cfg, tmp_path):
    items = [("robots.test", "/members/a.jpg"), ("robots.test", "/private/c.jpg")]
    for cache_hosts, want in ((0, 2), (16, 1)):
        before = len(server.request_log())
        section = section_for(cfg, robots_cache_hosts=cache_hosts, robots_cache_seconds=600)
        stats = [ShardJob(section, str(tmp_path / f"c{cache_hosts}"), resolver=stub_resolver)
                 .run(shard, rows_for(server, items)) for shard in (0, 1)]
        robots = [x for x in server.request_log()[before:] if x == ("robots.test", ROBOTS_PATH)]
        assert len(robots) == want, cache_hosts
        # both tasks decided the same way, and both keep the deciding document in their audit
        for shard, st in enumerate(stats):
            assert st["opt_out_sources"] == {"robots_txt": 1}
            assert (tmp_path / f"c{cache_hosts}" / "_stats" / "robots" / f"{shard:05d}.json").exists()
        if cache_hosts:
            assert stats[1]["consent"].get("hosts_from_worker_cache") == 1


def test_page_opt_out_rows_are_not_fetched_unless_disabled(server, cfg, tmp_path):
    server.add("/page-opt/a.jpg", jpeg_bytes(seed=21))
    server.add("/page-opt/b.jpg", jpeg_bytes(seed=22))
    rows = rows_for(server, [("r404.test", "/page-opt/a.jpg"), ("r404.test", "/page-opt/b.jpg")])
    rows[0]["page_opt_out"] = "robots=noai"
    _, meta = run_shard(section_for(cfg), tmp_path / "on", rows)
    assert server.requested(path="/page-opt/a.jpg") == 0
    assert meta[0]["status"] == "opted_out" and meta[0]["opt_out_source"] == "page_meta"
    assert meta[0]["error_message"] == "page http://r404.test/page.html: meta robots=noai"
    assert meta[0]["attempts"] == 0 and meta[1]["status"] == "success"
    _, meta = run_shard(section_for(cfg, respect_page_opt_out=False), tmp_path / "off", rows)
    assert meta[0]["status"] == "success" and server.requested(path="/page-opt/a.jpg") == 1


def test_opt_out_list_rows_are_never_requested(server, cfg, tmp_path):
    server.add("/listed/a.jpg", jpeg_bytes(seed=23))
    lst = tmp_path / "optout.txt"
    lst.write_text(f"list.test\nhttp://notlist.test:{server.port}/listed/\n")
    before = len(server.request_log())
    items = [("list.test", "/listed/a.jpg"), ("sub.list.test", "/listed/a.jpg"),
             ("notlist.test", "/listed/a.jpg"), ("notlist.test", "/ok.jpg")]
    stats, meta = run_shard(section_for(cfg, opt_out_list=str(lst)), tmp_path / "out", rows_for(server, items))
    assert [(r["status"], r["opt_out_source"]) for r in meta] == [("opted_out", "opt_out_list")] * 3 + [("success", None)]
    assert meta[0]["error_message"] == f"{lst}: domain list.test"
    assert meta[2]["error_message"] == f"{lst}: prefix http://notlist.test:{server.port}/listed/"
    log = server.request_log()[before:]
    assert not [x for x in log if x[1] == "/listed/a.jpg"]
    assert not [x for x in log if x[0] in ("list.test", "sub.list.test")]   # not even robots.txt
    assert stats["opt_out_sources"] == {"opt_out_list": 3}


def test_blocked_content_is_never_written_anywhere(server, cfg, tmp_path, monkeypatch):
    blocked_bytes = jpeg_bytes(330, 250, seed=31)
    server.add("/blocked.jpg", blocked_bytes)
    server.add("/fine.jpg", jpeg_bytes(330, 250, seed=32))
    lst = tmp_path / "blocked_sha256.txt"
    lst.write_text(hashlib.sha256(blocked_bytes).hexdigest() + "\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))     # anything spooled would land here
    out = tmp_path / "out"
    stats, meta = run_shard(section_for(cfg, blocked_sha256=str(lst)), out,
                               rows_for(server, [("r404.test", "/blocked.jpg"), ("r404.test", "/fine.jpg")]))
    assert [r["status"] for r in meta] == ["blocked_content", "success"]
    assert meta[0]["sha256"] == hashlib.sha256(blocked_bytes).hexdigest()
    assert "download.blocked_sha256" in meta[0]["error_message"]
    assert [s["__key__"] for s in iter_samples(str(out / "00000.tar"))] == [meta[1]["key"]]
    # no file under the output or the temp folder holds any 4 KB window of the blocked bytes
    probes = [blocked_bytes[i:i + 4096] for i in range(0, len(blocked_bytes) - 4096, 2048)]
    for folder in (out, tmp):
        for f in folder.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(p in data for p in probes), f
    assert stats["status_dict"]["blocked_content"] == 1


# --- WAT and WARC pages with meta opt-outs, through wat-extract and download (Spark) --------------

def _wat_payload(page_url: str, metas: list[dict], images: list[tuple[str, str]]) -> bytes:
    links = [{"path": "A@/href", "url": "/about"}] + [{"path": "IMG@/src", "url": u, "alt": a} for u, a in images]
    return json.dumps({"Envelope": {
        "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": page_url,
                                 "WARC-Date": "2024-05-18T00:00:00Z"},
        "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {
            "Head": {"Title": "a page", "Metas": metas}, "Links": links}}}}}).encode()


def _warc_file(path: Path, pages: list[tuple[str, str, list[tuple[str, str]]]]) -> None:
    """A WARC with one HTML response record per page: (page_url, extra <head> markup, images)."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for page_url, head, images in pages:
            imgs = "".join(f'<img src="{u}" alt="{a}">' for u, a in images)
            html = f"<html><head><title>t</title>{head}</head><body>{imgs}</body></html>".encode()
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(page_url, "response", payload=io.BytesIO(html),
                                                          length=len(html), http_headers=headers))


@pytest.mark.slow
def test_wat_and_warc_meta_opt_outs_mark_pairs_that_download_then_skips(spark, cfg, server, tmp_path):
    import argparse

    from spark_jobs import download, wat_extract
    from tests.gen import wat_writer as ww

    img = {}
    for name in ("wat-free", "wat-noai", "wat-tdm", "warc-free", "warc-noimageai", "warc-tdm"):
        img[name] = server.url(f"/meta/{name}.jpg")
        server.add(f"/meta/{name}.jpg", jpeg_bytes(seed=len(img) + 40))
    site = "http://pages.example.org"
    wat = tmp_path / "in" / "CC-MAIN-20240517233122-20240518023122-00000.warc.wat.gz"
    ww.write_wat(wat, [
        ww.RawRecord(_wat_payload(f"{site}/free.html", [{"name": "robots", "content": "index, follow"}],
                                  [(img["wat-free"], "An image that may be used")]), f"{site}/free.html"),
        ww.RawRecord(_wat_payload(f"{site}/noai.html", [{"name": "viewport", "content": "x"},
                                                        {"name": "robots", "content": "noai, noimageai"}],
                                  [(img["wat-noai"], "An image of a page that said noai")]), f"{site}/noai.html"),
        ww.RawRecord(_wat_payload(f"{site}/tdm.html", [{"name": "tdm-reservation", "content": "1"}],
                                  [(img["wat-tdm"], "An image of a page with a TDM reservation")]),
                     f"{site}/tdm.html"),
    ])
    warc = tmp_path / "warc" / "CC-MAIN-20240517233122-20240518023122-00001.warc.gz"
    warc.parent.mkdir()
    _warc_file(warc, [
        (f"{site}/w-free.html", '<meta name="description" content="noai">', [(img["warc-free"], "A free WARC image")]),
        (f"{site}/w-noimageai.html", '<meta name="ROBOTS" content="noimageai">',
         [(img["warc-noimageai"], "A WARC image of a noimageai page")]),
        (f"{site}/w-tdm.html", '<meta name="tdm-reservation" content="1">',
         [(img["warc-tdm"], "A WARC image of a reserved page")]),
    ])
    expected = {"wat-free": None, "wat-noai": "robots=noai", "wat-tdm": "tdm-reservation=1",
                "warc-free": None, "warc-noimageai": "robots=noimageai", "warc-tdm": "tdm-reservation=1"}

    pairs = {}
    for fmt, src in (("wat", wat), ("warc", warc)):
        parser = argparse.ArgumentParser()
        wat_extract.add_arguments(parser)
        out = str(tmp_path / f"pairs_{fmt}")
        wat_extract.run(spark, cfg.with_overrides(["wat_extract.output_partitions=1"]),
                        parser.parse_args(["--input", str(src), "--output", out, "--format", fmt]))
        for r in spark.read.parquet(out).select("url", "page_opt_out").collect():
            pairs[r["url"]] = r["page_opt_out"]
    assert pairs == {img[k]: v for k, v in expected.items()}

    conf = cfg.with_overrides(["download.allowed_cidrs=127.0.0.0/8", "download.read_timeout=0.5",
                               "download.retries=0", "download.thread_count=4", "download.shard_size=4"])
    before = len(server.request_log())
    out = tmp_path / "images"
    parser = argparse.ArgumentParser()
    download.add_arguments(parser)
    stats = download.run(spark, conf, parser.parse_args(["--input", str(tmp_path / "pairs_wat"),
                                                         "--output", str(out)]))
    stats2 = download.run(spark, conf, parser.parse_args(["--input", str(tmp_path / "pairs_warc"),
                                                          "--output", str(tmp_path / "images_warc")]))
    meta = {r["url"]: r for r in spark.read.parquet(str(out / "*.parquet"), str(tmp_path / "images_warc" / "*.parquet"))
            .select("url", "status", "opt_out_source", "error_message").collect()}
    for name, reason in expected.items():
        row = meta[img[name]]
        if reason is None:
            assert row["status"] == "success", name
        else:
            assert (row["status"], row["opt_out_source"]) == ("opted_out", "page_meta"), name
            assert row["error_message"].endswith(f"meta {reason}")
    requested = {p for _, p in server.request_log()[before:]}
    assert requested >= {"/meta/wat-free.jpg", "/meta/warc-free.jpg"}
    assert not {f"/meta/{n}.jpg" for n, r in expected.items() if r} & requested
    assert stats["opt_out_by_source"] == {"page_meta": 2} == stats2["opt_out_by_source"]
    assert stats["status_counts"] == {"success": 1, "opted_out": 2}


def test_report_charts_opted_out_rows_per_source(tmp_path):
    from reporting.report import _opt_out_section
    from udfs.download.download_worker import _parquet_bytes

    rows = ([{"key": f"{i:09d}", "status": "opted_out", "opt_out_source": "robots_txt"} for i in range(3)]
            + [{"key": "000000010", "status": "opted_out", "opt_out_source": "page_meta"},
               {"key": "000000011", "status": "success"}, {"key": "000000012", "status": "failed_to_download"}])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00000.parquet").write_bytes(_parquet_bytes(rows))
    out = tmp_path / "report"
    out.mkdir()
    section = _opt_out_section(str(tmp_path), {"download": "images"}, out)
    assert "page_meta: 1, opt_out_list: 0, robots_txt: 3, tdmrep: 0, x_robots_tag: 0" in section
    assert (out / "opt_outs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unresolvable_or_guarded_host_is_a_download_failure_not_an_opt_out(server, cfg, tmp_path):
    """A dead host must not inflate the opt-out counts: its robots.txt decides nothing and the image
    fails as it would without consent checks. No connection is made to either."""
    def resolver(host, port):
        if host == "dead.test":
            from udfs.download.address_guard import ResolveError
            raise ResolveError("cannot resolve dead.test")
        return {"private.test": ["10.0.0.9"]}.get(host) or stub_resolver(host, port)

    before = len(server.request_log())
    rows = [{"key": "000000000", "url": "http://dead.test/a.jpg", "text": "t"},
            {"key": "000000001", "url": "http://private.test/a.jpg", "text": "t"}]
    stats = ShardJob(section_for(cfg), str(tmp_path), resolver=resolver).run(0, rows)
    meta = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [(r["status"], r["opt_out_source"]) for r in meta] == [("failed_to_download", None),
                                                                  ("blocked_address", None)]
    assert stats["consent"]["robots_txt_blocked"] == 2 and "opted_out" not in stats["status_dict"]
    assert len(server.request_log()) == before


def test_phash_blocklist_drops_listed_content_and_its_near_copies(server, cfg, tmp_path):
    """download.blocked_phash: the listed photo and a resized, re-encoded copy of it are never
    written (blocked_content, hash and distance named); an unrelated photo is kept. The listed
    hash is computed here from the full-size original, not by the download path."""
    import io

    from PIL import Image

    from tests.gen.photos import jpeg, photo_like
    from udfs.download import image_hash

    listed = photo_like(seed=41, size=(480, 360))
    copy = listed.resize((400, 300), Image.Resampling.BILINEAR)
    server.add("/listed.jpg", jpeg(listed, quality=90))
    server.add("/copy.jpg", jpeg(copy, quality=50))
    server.add("/other.jpg", jpeg(photo_like(seed=42, size=(480, 360)), quality=90))
    want = image_hash.to_hex(image_hash.phash(Image.open(io.BytesIO(jpeg(listed, quality=90)))))
    lst = tmp_path / "blocked_phash.txt"
    lst.write_text(f"# partner list\n{want}\nnot-a-hash\n")
    out = tmp_path / "out"
    stats, meta = run_shard(section_for(cfg, blocked_phash=str(lst), blocked_phash_distance=6), out,
                            rows_for(server, [("r404.test", "/listed.jpg"), ("r404.test", "/copy.jpg"),
                                              ("r404.test", "/other.jpg")]))
    assert [r["status"] for r in meta] == ["blocked_content", "blocked_content", "success"]
    for r in meta[:2]:
        assert "download.blocked_phash" in r["error_message"] and want.removeprefix("0x") in r["error_message"]
        assert r["phash"] is None
    assert [s["__key__"] for s in iter_samples(str(out / "00000.tar"))] == [meta[2]["key"]]
    assert image_hash.hamming(meta[2]["phash"], int(want, 16)) > 6
