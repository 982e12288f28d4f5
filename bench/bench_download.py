"""Download throughput and memory: clipcrawl `download` vs img2dataset 1.47, side by side.

~2,000 generated photo-like JPEGs (400-1600 px wide) are served by the loopback image server with
20-50 ms injected latency per request and a 10% failure mix (404, 500, corrupt bytes). Both tools
get the same URL parquet, 256 px border resize, JPEG quality 95, 2 processes x 32 threads, no
retries, and the same shard size. Measured per tool: wall time of the whole command (startup
included), successes, peak RSS of the whole process tree (psutil, sampled every 50 ms; summed RSS
counts pages shared after fork once per process, for both tools alike).

Also: the same URLs fetched (bodies only) by our threaded Fetcher and by an asyncio/aiohttp client
at equal concurrency, which is how threads were chosen over asyncio.

Four runs: `clipcrawl download` under Spark local[2] as a fresh command (JVM start included in its
time and memory), the same stage on a running SparkSession (child process: start and warm the
session with a small download, then time the stage; memory is the whole child's), our shard
engine (`udfs.download_worker`) in a plain 2-process pool (the like-for-like comparison with
img2dataset's multiprocessing distributor), and img2dataset in its own venv under the bench work
dir (created on first use: `python3 -m venv; pip install img2dataset==1.47.0`, cached).

Consent cost (`python -m bench.bench_download consent [--quick]`, also part of `run`): the shard
engine on the same 2,000 URLs with robots.txt + tdmrep.json checks off and on, alternated round
by round, every image host serving both documents (rules that match no bench URL, so both runs do
the same image work). Measured on one host (the bench's own layout) and with the URLs spread over
16 host names (stub resolver -> 127.0.0.1) with the per-worker cache off, i.e. one robots.txt and
one tdmrep.json fetch per host per task, the worst case. Plus protego vs urllib.robotparser:
wildcard cases right, and parse + check time.

Settings needed for the loopback server: our stage needs `download.allowed_cidrs=127.0.0.0/8`
(address guard) and `per_domain_concurrency` = thread_count because every bench URL has the same
host; img2dataset needs nothing special (it has no address guard); proxies are cleared from the
environment of both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
I2D_VERSION = "1.47.0"
PROCESSES = 2
THREADS = 32
WARMUP = 200   # URLs of the running-session child's warm-up download


# --- inputs ------------------------------------------------------------------------------------

def generate_images(folder: Path, n: int) -> list[Path]:
    """Photo-like JPEGs of varied size, cached on disk between runs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(1234)
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        w = int(rng.integers(400, 1601))
        h = int(w * rng.uniform(0.5, 1.0))
        if not path.exists():
            r = np.random.default_rng(i)
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + int(r.integers(0, 128))], -1)
            img = np.clip(base + r.integers(-12, 13, size=base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img, "RGB").save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def register(server, images: list[Path]) -> list[str]:
    """One URL per image; every 10th row is a failure: 404, 500 or corrupt bytes in turn."""
    urls = []
    for i, path in enumerate(images):
        name = f"/img/{i:05d}.jpg"
        if i % 10 == 3:
            kind = (i // 10) % 3
            if kind == 0:
                pass   # unregistered: 404
            elif kind == 1:
                server.add(name, b"error", "text/plain", status=500)
            else:
                server.add(name, b"\xff\xd8\xff\xe0" + os.urandom(20000))
        else:
            server.add(name, path.read_bytes())
        urls.append(server.url(name))
    return urls


# --- measuring ---------------------------------------------------------------------------------

def measure(cmd: list[str], env: dict, log_path: Path, timeout: float = 900) -> dict:
    import psutil

    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        peak = [0]
        stop = threading.Event()

        def sample():
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not stop.is_set():
                total = 0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            pass
                except psutil.NoSuchProcess:
                    break
                peak[0] = max(peak[0], total)
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            stop.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[0]} ... exited {rc}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": peak[0] / 2**20}


def count_status(folder: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for f in sorted(folder.glob("*.parquet")):
        for s in pq.read_table(f, columns=["status"]).column("status").to_pylist():
            counts[s] = counts.get(s, 0) + 1
    return counts


def shard_window(folder: Path) -> float:
    """First shard start to last shard end, from the per-shard stats files both tools write
    (`start_time`, `end_time`): the download work without process/JVM startup and planning."""
    starts, ends = [], []
    for f in folder.glob("[0-9]*_stats.json"):
        s = json.loads(f.read_text())
        starts.append(float(s["start_time"]))
        ends.append(float(s["end_time"]))
    return max(ends) - min(starts) if starts else float("nan")


def ensure_img2dataset(work: Path) -> Path:
    venv = work / "i2d-venv"
    exe = venv / "bin" / "img2dataset"
    marker = venv / f".img2dataset-{I2D_VERSION}"
    if not marker.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
        marker.touch()
    return exe


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(no_proxy="*", NO_PROXY="*", NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO),
               PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    return env


# Spark settings of both Spark runs (the CLI and the running session); the rest is the local profile.
SPARK_SETS = [f"spark.master=local[{PROCESSES}]", "spark.conf.spark.driver.memory=512m",
              "spark.conf.spark.ui.enabled=false", "spark.conf.spark.ui.showConsoleProgress=false"]


def download_sets(shard_size: int) -> list[str]:
    return ["download.allowed_cidrs=127.0.0.0/8", f"download.thread_count={THREADS}",
            f"download.per_domain_concurrency={THREADS}", "download.retries=0", "download.image_size=256",
            "download.resize_mode=border", "download.output_format=jpg", "download.encode_quality=95",
            f"download.shard_size={shard_size}", "download.read_timeout=10", "download.min_image_bytes=0"]


# --- the engine-only run (a child process: python -m bench.bench_download engine ...) ------------

def engine_main(inp: str, out: str, shard_size: int) -> None:
    """Our shard engine without Spark: same sort-by-uid sharding, a plain process pool."""
    from multiprocessing import Pool

    import pyarrow.parquet as pq

    from spark_jobs.config import load_config
    from udfs.download_worker import make_key
    from udfs.ids import pair_uid

    section = load_config("local", overrides=download_sets(shard_size)).section("download")
    table = pq.read_table(inp).to_pylist()
    rows = sorted(({"uid": pair_uid(r["url"], r["text"]), "url": r["url"], "text": r["text"], "page_url": None}
                   for r in table), key=lambda r: (r["uid"], r["url"], r["text"]))
    shards: dict[int, list[dict]] = {}
    for rank, row in enumerate(rows):
        shard = rank // shard_size
        shards.setdefault(shard, []).append(dict(row, key=make_key(shard, rank % shard_size, 4)))
    with Pool(PROCESSES) as pool:
        stats = pool.starmap(_engine_shard, [(s, r, section, out) for s, r in sorted(shards.items())])
    Path(out, "_engine_summary.json").write_text(json.dumps(stats))


def session_main(inp: str, out: str, shard_size: int, warm_inp: str) -> None:
    """The stage on a running SparkSession, as `clipcrawl run`, a notebook or a multi-stage
    spark-submit job runs it: the session is started and warmed by a small download (a separate
    input and output) first, then the timed run. Its seconds go to <out>/_bench_session.json."""
    import argparse as ap

    from spark_jobs import download
    from spark_jobs.config import load_config
    from spark_jobs.session import get_spark

    cfg = load_config("local", overrides=[*SPARK_SETS, *download_sets(shard_size)])
    spark = get_spark(cfg, "bench-download")
    download.run(spark, cfg, ap.Namespace(input=warm_inp, output=out + "_warmup", retry_failed=None))
    t0 = time.perf_counter()
    stats = download.run(spark, cfg, ap.Namespace(input=inp, output=out, retry_failed=None))
    Path(out, "_bench_session.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                            "phase_seconds": stats["phase_seconds"]}))


def _engine_shard(shard, rows, section, out):
    from udfs.download_worker import download_shard

    return download_shard(shard, rows, section, out)


# --- the benchmark -----------------------------------------------------------------------------

def run(work: Path, quick: bool) -> list[dict]:
    import pandas as pd

    from tests.gen.image_server import ImageServer

    work.mkdir(parents=True, exist_ok=True)
    n = 400 if quick else 2000
    shard_size = n // 8
    rounds = 1 if quick else 2
    images = generate_images(work / "source_images", n)
    exe = ensure_img2dataset(work)
    env = clean_env()
    results: dict[str, list[dict]] = {"spark": [], "session": [], "engine": [], "img2dataset": []}
    with ImageServer(latency=(0.02, 0.05)) as server:
        urls = register(server, images)
        inp = work / "urls.parquet"
        pd.DataFrame({"url": urls, "text": [f"a generated photo number {i}" for i in range(n)]}).to_parquet(inp)
        warm_inp = work / "warmup_urls.parquet"   # a different input for the session's warm-up run
        pd.DataFrame({"url": urls[:WARMUP], "text": [f"warm-up photo {i}" for i in range(WARMUP)]}).to_parquet(warm_inp)
        ta = [fetch_threads_vs_asyncio(urls[: min(n, 600)]) for _ in range(3)]
        for rnd in range(rounds):
            for name in ("img2dataset", "spark", "session", "engine"):
                out = work / f"out_{name}_{rnd}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                if name == "spark":
                    cmd = [sys.executable, "-m", "spark_jobs.cli", "download", "--input", str(inp), "--output", str(out),
                           "--log-level", "WARNING"]
                    for s in [*SPARK_SETS, *download_sets(shard_size)]:
                        cmd += ["--set", s]
                elif name == "session":
                    subprocess.run(["rm", "-rf", str(out) + "_warmup"], check=True)
                    cmd = [sys.executable, "-m", "bench.bench_download", "session", str(inp), str(out), str(shard_size),
                           str(warm_inp)]
                elif name == "engine":
                    cmd = [sys.executable, "-m", "bench.bench_download", "engine", str(inp), str(out), str(shard_size)]
                else:
                    cmd = [str(exe), "--url_list", str(inp), "--input_format", "parquet", "--url_col", "url",
                           "--caption_col", "text", "--output_format", "webdataset", "--output_folder", str(out),
                           "--processes_count", str(PROCESSES), "--thread_count", str(THREADS),
                           "--image_size", "256", "--resize_mode", "border", "--encode_quality", "95",
                           "--encode_format", "jpg", "--number_sample_per_shard", str(shard_size),
                           "--distributor", "multiprocessing", "--retries", "0", "--timeout", "10",
                           "--enable_wandb", "False"]
                m = measure(cmd, env, work / f"{name}_{rnd}.log")
                m["counts"] = count_status(out)
                m["ok"] = m["counts"].get("success", 0)
                m["rows"] = sum(m["counts"].values())
                m["images_per_s"] = m["rows"] / m["seconds"]
                m["shard_window_s"] = shard_window(out)
                if name == "spark":
                    stats = json.loads((out / "_stats" / "stats.json").read_text())
                    m["worker_seconds"] = stats.get("worker_seconds", {})
                    m["download_phase_s"] = stats.get("phase_seconds", {}).get("download")
                if name == "session":   # the timed run only; peak RSS stays the whole child's
                    timed = json.loads((out / "_bench_session.json").read_text())
                    m["process_seconds"], m["seconds"] = m["seconds"], timed["seconds"]
                    m["phase_seconds"] = timed["phase_seconds"]
                    m["images_per_s"] = m["rows"] / m["seconds"]
                results[name].append(m)
                print(f"   {name} round {rnd}: {m['rows']} rows, {m['ok']} ok in {m['seconds']:.1f}s "
                      f"({m['images_per_s']:.0f}/s), peak {m['peak_rss_mb']:.0f} MB", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))

    def best(name):
        return max(results[name], key=lambda m: m["images_per_s"])

    i2d, spark, engine, session = best("img2dataset"), best("spark"), best("engine"), best("session")
    ws = spark.get("worker_seconds", {})
    busy = sum(v for k, v in ws.items() if k in ("network", "decode", "resize", "encode", "write"))
    where = ", ".join(f"{k} {100 * ws.get(k, 0) / busy:.0f}%" for k in ("network", "decode", "resize", "encode", "write")) \
        if busy else "n/a"
    common = (f"{n} URLs, 20-50 ms latency, 10% failures, {PROCESSES} processes x {THREADS} threads, "
              f"256 border jpg q95, best of {rounds}")
    figures = [
        {"name": "throughput, spark stage vs img2dataset", "value": round(spark["images_per_s"], 1), "unit": "rows/s",
         "peer": f"img2dataset {I2D_VERSION}", "peer_value": round(i2d["images_per_s"], 1),
         "ratio": round(spark["images_per_s"] / i2d["images_per_s"], 2), "goal": ">= 1.5",
         "note": f"wall time incl. Spark/JVM startup; {common}; successes ours {spark['ok']} vs {i2d['ok']}; "
                 f"download phase alone {spark.get('download_phase_s')} s"},
        {"name": "throughput, spark stage on a running session vs img2dataset", "value": round(session["images_per_s"], 1),
         "unit": "rows/s", "peer": f"img2dataset {I2D_VERSION} (whole command)", "peer_value": round(i2d["images_per_s"], 1),
         "ratio": round(session["images_per_s"] / i2d["images_per_s"], 2), "goal": ">= 1.5",
         "note": f"download.run timed on a SparkSession already started and warmed by a {WARMUP}-URL download "
                 f"(how `clipcrawl run`, a notebook or a multi-stage job runs it: earlier stages warm the JVM); "
                 f"phases {session.get('phase_seconds')}; img2dataset's time includes its own startup; "
                 f"{common}; successes {session['ok']}"},
        {"name": "peak memory, spark stage on a running session vs img2dataset", "value": round(session["peak_rss_mb"]),
         "unit": "MB", "peer": f"img2dataset {I2D_VERSION}", "peer_value": round(i2d["peak_rss_mb"]),
         "ratio": round(session["peak_rss_mb"] / i2d["peak_rss_mb"], 2), "goal": "<= 1.0",
         "note": "process-tree RSS of the whole child (session start, warm-up and timed run), JVM included"},
        {"name": "throughput within the shard window, spark stage vs img2dataset",
         "value": round(spark["rows"] / spark["shard_window_s"], 1), "unit": "rows/s",
         "peer": f"img2dataset {I2D_VERSION}", "peer_value": round(i2d["rows"] / i2d["shard_window_s"], 1),
         "ratio": round((spark["rows"] / spark["shard_window_s"]) / (i2d["rows"] / i2d["shard_window_s"]), 2),
         "goal": ">= 1.5",
         "note": "rows / (last shard end - first shard start) from both tools' per-shard stats: excludes startup "
                 "(JVM, imports) and our planning jobs, i.e. the part that grows with the input"},
        {"name": "peak memory, spark stage vs img2dataset", "value": round(spark["peak_rss_mb"]), "unit": "MB",
         "peer": f"img2dataset {I2D_VERSION}", "peer_value": round(i2d["peak_rss_mb"]),
         "ratio": round(spark["peak_rss_mb"] / i2d["peak_rss_mb"], 2), "goal": "<= 1.0",
         "note": "process-tree RSS; ours includes the Spark JVM (driver.memory=512m) and its Python workers"},
        {"name": "throughput, shard engine vs img2dataset", "value": round(engine["images_per_s"], 1), "unit": "rows/s",
         "peer": f"img2dataset {I2D_VERSION}", "peer_value": round(i2d["images_per_s"], 1),
         "ratio": round(engine["images_per_s"] / i2d["images_per_s"], 2), "goal": ">= 1.5",
         "note": f"udfs.download_worker in a 2-process pool, no Spark; successes {engine['ok']}"},
        {"name": "peak memory, shard engine vs img2dataset", "value": round(engine["peak_rss_mb"]), "unit": "MB",
         "peer": f"img2dataset {I2D_VERSION}", "peer_value": round(i2d["peak_rss_mb"]),
         "ratio": round(engine["peak_rss_mb"] / i2d["peak_rss_mb"], 2), "goal": "<= 1.0",
         "note": "process-tree RSS"},
        {"name": "where the time goes (spark stage)", "value": round(busy, 1), "unit": "thread-s",
         "peer": "", "peer_value": None, "ratio": None, "goal": "",
         "note": f"summed over fetch threads: {where}"},
        {"name": "fetch only: threads vs asyncio", "value": round(min(t["threads_s"] for t in ta), 3), "unit": "s",
         "peer": "asyncio + aiohttp", "peer_value": round(min(t["asyncio_s"] for t in ta), 3),
         "ratio": round(min(t["asyncio_s"] for t in ta) / min(t["threads_s"] for t in ta), 2), "goal": ">= 1.0",
         "note": f"{min(n, 600)} URLs, bodies only, {THREADS} concurrent, best of 3; ratio = asyncio time / threads "
                 "time. Near 1: the network part is a tie, and threads also overlap PIL decode/resize (which "
                 "release the GIL) without a second pool, so the shard engine uses threads"},
    ]
    return figures + consent_cost(work / "consent", quick, images)


# --- consent cost: robots.txt + tdmrep.json off vs on --------------------------------------------

BENCH_ROBOTS_TXT = b"""User-agent: *
Disallow: /private/
Disallow: /*.gif$
Disallow: /gallery/*/original

User-agent: clipcrawl
Disallow: /private/
Disallow: /*.gif$
"""
BENCH_TDMREP_JSON = b'[{"location": "/private/*", "tdm-reservation": 1}, {"location": "/", "tdm-reservation": 0}]'
CONSENT_HOSTS = 16


def _bench_resolver(host, port):
    # the bench's host names all mean this machine; nothing else is resolved
    if host == "127.0.0.1" or host.endswith(".bench.test"):
        return ["127.0.0.1"]
    raise OSError(f"bench resolver: unexpected host {host}")


def _consent_shard(shard, rows, section, out):
    from udfs.download_worker import download_shard

    return download_shard(shard, rows, section, out, resolver=_bench_resolver)


def _consent_run(urls: list[str], out: Path, shard_size: int, consent: bool, cache_hosts: int) -> dict:
    from multiprocessing import Pool

    from spark_jobs.config import load_config
    from udfs.download_worker import make_key

    subprocess.run(["rm", "-rf", str(out)], check=True)
    sets = [*download_sets(shard_size), f"download.robots_txt={str(consent).lower()}",
            f"download.tdmrep={str(consent).lower()}", f"download.robots_cache_hosts={cache_hosts}"]
    section = load_config("local", overrides=sets).section("download")
    shards: dict[int, list[dict]] = {}
    for rank, url in enumerate(urls):   # urls come shuffled: every shard sees every host
        shard = rank // shard_size
        shards.setdefault(shard, []).append({"key": make_key(shard, rank % shard_size, 4), "url": url,
                                             "text": f"photo {rank}", "uid": None, "page_url": None})
    with Pool(PROCESSES) as pool:
        t0 = time.perf_counter()
        stats = pool.starmap(_consent_shard, [(s, r, section, str(out)) for s, r in sorted(shards.items())])
        seconds = time.perf_counter() - t0
    consent_counts: dict[str, int] = {}
    for st in stats:
        for k, v in st.get("consent", {}).items():
            consent_counts[k] = consent_counts.get(k, 0) + v
    return {"seconds": seconds, "ok": sum(st["successes"] for st in stats), "consent": consent_counts}


def _robots_parsers(rounds: int = 5) -> dict:
    """protego vs urllib.robotparser: wildcard cases right (tests/test_consent.py's table) and the
    time to parse a robots.txt and check 2,000 URLs."""
    import urllib.robotparser

    from protego import Protego

    from tests.test_consent import WILDCARD_CASES

    right = {"protego": 0, "urllib": 0}
    for rules, path, allowed in WILDCARD_CASES:
        text = "User-agent: *\n" + rules + "\n"
        right["protego"] += Protego.parse(text).can_fetch("http://h" + path, "clipcrawl") == allowed
        rp = urllib.robotparser.RobotFileParser()
        rp.parse(text.splitlines())
        right["urllib"] += rp.can_fetch("clipcrawl", "http://h" + path) == allowed
    text = BENCH_ROBOTS_TXT.decode()
    urls = [f"http://h/img/{i:05d}.jpg" for i in range(2000)]
    best = {"protego": float("inf"), "urllib": float("inf")}
    for _ in range(rounds):
        t0 = time.perf_counter()
        p = Protego.parse(text)
        for u in urls:
            p.can_fetch(u, "clipcrawl")
        best["protego"] = min(best["protego"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        rp = urllib.robotparser.RobotFileParser()
        rp.parse(text.splitlines())
        for u in urls:
            rp.can_fetch("clipcrawl", u)
        best["urllib"] = min(best["urllib"], time.perf_counter() - t0)
    return {"right": right, "cases": len(WILDCARD_CASES), "seconds": best}


def consent_cost(work: Path, quick: bool, images: list[Path] | None = None) -> list[dict]:
    import random
    import statistics

    from tests.gen.image_server import ImageServer

    work.mkdir(parents=True, exist_ok=True)
    n = 400 if quick else 2000
    shard_size = n // 8
    rounds = 1 if quick else 3
    images = images or generate_images(work.parent / "source_images", n)
    figures = []
    with ImageServer(latency=(0.02, 0.05)) as server:
        paths = [u.split(str(server.port), 1)[1] for u in register(server, images[:n])]
        server.add("/robots.txt", BENCH_ROBOTS_TXT, "text/plain")
        server.add("/.well-known/tdmrep.json", BENCH_TDMREP_JSON, "application/json")
        rng = random.Random(7)
        layouts = {
            "one host": ([server.url(p) for p in paths], 1024),
            f"{CONSENT_HOSTS} hosts, no worker cache": (
                [f"http://h{i % CONSENT_HOSTS}.bench.test:{server.port}{p}" for i, p in enumerate(paths)], 0),
        }
        for label, (urls, cache_hosts) in layouts.items():
            urls = urls[:]
            rng.shuffle(urls)
            times: dict[bool, list[float]] = {False: [], True: []}
            last: dict[bool, dict] = {}
            for rnd in range(rounds):
                for consent in ((False, True) if rnd % 2 == 0 else (True, False)):   # alternate the order
                    m = _consent_run(urls, work / f"out_{consent}", shard_size, consent, cache_hosts)
                    times[consent].append(m["seconds"])
                    last[consent] = m
                    print(f"   consent {label} {'on' if consent else 'off'} round {rnd}: {m['ok']} ok in "
                          f"{m['seconds']:.2f}s {m['consent']}", flush=True)
            off, on = statistics.median(times[False]), statistics.median(times[True])
            fetched = last[True]["consent"].get("robots_txt_fetched", 0) + last[True]["consent"].get("tdmrep_fetched", 0)
            figures.append({
                "name": f"robots.txt + tdmrep.json cost, {label}", "value": round(on, 2), "unit": "s",
                "peer": "same run with download.robots_txt=false, tdmrep=false", "peer_value": round(off, 2),
                "ratio": round(on / off, 3), "goal": "<= 1.05",
                "note": f"{n} URLs, shard engine, {PROCESSES} processes x {THREADS} threads, 8 shards, median of "
                        f"{rounds} alternated rounds each; every host serves robots.txt and tdmrep.json; "
                        f"{fetched} document fetches in the last 'on' run; successes on {last[True]['ok']} / off "
                        f"{last[False]['ok']}; each run {sorted(round(t, 2) for t in times[True])} vs "
                        f"{sorted(round(t, 2) for t in times[False])} s; shared machine"})
    parsers = _robots_parsers()
    figures.append({
        "name": "robots.txt parser: protego vs urllib.robotparser", "value": parsers["right"]["protego"],
        "unit": f"of {parsers['cases']} wildcard cases right", "peer": "urllib.robotparser",
        "peer_value": parsers["right"]["urllib"],
        "ratio": round(parsers["seconds"]["protego"] / parsers["seconds"]["urllib"], 2), "goal": "",
        "note": f"cases from RFC 9309 / the documented wildcard examples (tests/test_consent.py); ratio = time "
                f"to parse the bench robots.txt and check 2,000 URLs, protego {parsers['seconds']['protego'] * 1e3:.1f} ms "
                f"vs urllib {parsers['seconds']['urllib'] * 1e3:.1f} ms (best of 5)"})
    return figures


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "consent":
        quick = "--quick" in sys.argv
        print(json.dumps(consent_cost(REPO / "bench" / "work" / "download" / "consent", quick), indent=2))
    elif len(sys.argv) == 5 and sys.argv[1] == "engine":
        engine_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) == 6 and sys.argv[1] == "session":
        session_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        print("usage: python -m bench --only download [--quick]", file=sys.stderr)
        sys.exit(2)


# --- threads vs asyncio, network only (why the shard engine uses threads) ------------------------

def fetch_threads_vs_asyncio(urls: list[str], concurrency: int = THREADS) -> dict:
    """Fetch the same URLs (bodies only, no decode) with our threaded Fetcher and with an asyncio
    aiohttp client at the same concurrency; seconds for each."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from udfs.fetch import FetchConfig, Fetcher

    fetcher = Fetcher(FetchConfig(allowed_cidrs="127.0.0.0/8", retries=0, per_domain_concurrency=concurrency))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ok_threads = sum(r.ok for r in pool.map(fetcher.fetch, urls))
    threads_s = time.perf_counter() - t0

    async def main():
        import aiohttp

        sem = asyncio.Semaphore(concurrency)
        conn = aiohttp.TCPConnector(limit=concurrency, force_close=True)
        async with aiohttp.ClientSession(connector=conn, trust_env=False) as session:
            async def one(url):
                async with sem:
                    try:
                        async with session.get(url) as resp:
                            body = await resp.read()
                            return resp.status == 200 and len(body) > 0
                    except aiohttp.ClientError:
                        return False
            return sum(await asyncio.gather(*(one(u) for u in urls)))

    t0 = time.perf_counter()
    ok_async = asyncio.run(main())
    async_s = time.perf_counter() - t0
    return {"threads_s": threads_s, "asyncio_s": async_s, "ok_threads": ok_threads, "ok_async": ok_async}
