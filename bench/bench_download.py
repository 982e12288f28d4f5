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
engine (`udfs.download.download_worker`) in a plain 2-process pool (the like-for-like comparison with
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


def register(server, images: list[Path], n: int | None = None) -> list[str]:
    """`n` URLs (default: one per image; past the images' count they are served again under new
    paths); every 10th row is a failure: 404, 500 or corrupt bytes in turn."""
    urls = []
    data = [None] * len(images)
    for i in range(len(images) if n is None else n):
        j = i % len(images)
        if data[j] is None:
            data[j] = images[j].read_bytes()
        path = images[j]
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
            server.add(name, data[j] if data[j] is not None else path.read_bytes())
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
            f"download.per_domain_concurrency={THREADS}", f"download.per_host_concurrency={PROCESSES * THREADS}",
            "download.retries=0", "download.image_size=256",
            "download.resize_mode=border", "download.output_format=jpg", "download.encode_quality=95",
            f"download.shard_size={shard_size}", "download.read_timeout=10", "download.min_image_bytes=0"]


# --- the engine-only run (a child process: python -m bench.bench_download engine ...) ------------

def engine_main(inp: str, out: str, shard_size: int) -> None:
    """Our shard engine without Spark: same sort-by-uid sharding, a plain process pool."""
    from multiprocessing import Pool

    import pyarrow.parquet as pq

    from spark_jobs.config import load_config
    from udfs.download.download_worker import make_key
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
    from udfs.download.download_worker import download_shard

    return download_shard(shard, rows, section, out)


def _tool_cmd(name: str, exe: Path, inp: Path, out: Path, shard_size: int, warm_inp: Path,
              extra_sets: list[str] = ()) -> list[str]:
    if name == "spark":
        cmd = [sys.executable, "-m", "spark_jobs.cli", "download", "--input", str(inp), "--output", str(out),
               "--log-level", "WARNING"]
        for s in [*SPARK_SETS, *download_sets(shard_size), *extra_sets]:
            cmd += ["--set", s]
        return cmd
    if name == "session":
        subprocess.run(["rm", "-rf", str(out) + "_warmup"], check=True)
        return [sys.executable, "-m", "bench.bench_download", "session", str(inp), str(out), str(shard_size),
                str(warm_inp)]
    if name == "engine":
        return [sys.executable, "-m", "bench.bench_download", "engine", str(inp), str(out), str(shard_size)]
    return [str(exe), "--url_list", str(inp), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "text", "--output_format", "webdataset", "--output_folder", str(out),
            "--processes_count", str(PROCESSES), "--thread_count", str(THREADS),
            "--image_size", "256", "--resize_mode", "border", "--encode_quality", "95",
            "--encode_format", "jpg", "--number_sample_per_shard", str(shard_size),
            "--distributor", "multiprocessing", "--retries", "0", "--timeout", "10",
            "--enable_wandb", "False"]


def _measure_tool(name: str, work: Path, tag: str, exe: Path, inp: Path, shard_size: int, warm_inp: Path,
                  env: dict, extra_sets: list[str] = ()) -> dict:
    out = work / f"out_{tag}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    # 900 s, or 20 rows/s for a large input: img2dataset's 50,000 URLs ran past 900 s on the busy
    # machine (37,500 rows done when the timeout killed it)
    import pyarrow.parquet as pq

    rows_in = pq.read_metadata(inp).num_rows
    m = measure(_tool_cmd(name, exe, inp, out, shard_size, warm_inp, extra_sets), env, work / f"{tag}.log",
                timeout=max(900.0, rows_in / 20))
    m["counts"] = count_status(out)
    m["ok"] = m["counts"].get("success", 0)
    m["rows"] = sum(m["counts"].values())
    m["images_per_s"] = m["rows"] / m["seconds"]
    m["shard_window_s"] = shard_window(out)
    if name == "spark":
        stats = json.loads((out / "_stats" / "stats.json").read_text())
        m["worker_seconds"] = stats.get("worker_seconds", {})
        m["phase_seconds"] = stats.get("phase_seconds", {})
        m["download_phase_s"] = m["phase_seconds"].get("download")
    if name == "session":   # the timed run only; peak RSS stays the whole child's
        timed = json.loads((out / "_bench_session.json").read_text())
        m["process_seconds"], m["seconds"] = m["seconds"], timed["seconds"]
        m["phase_seconds"] = timed["phase_seconds"]
        m["images_per_s"] = m["rows"] / m["seconds"]
    subprocess.run(["rm", "-rf", str(out), str(out) + "_warmup"], check=True)   # 50k rounds: disk
    print(f"   {tag}: {m['rows']} rows, {m['ok']} ok in {m['seconds']:.1f}s ({m['images_per_s']:.0f}/s), "
          f"peak {m['peak_rss_mb']:.0f} MB", flush=True)
    return m


def _inputs(work: Path, urls: list[str], n: int) -> tuple[Path, Path]:
    import pandas as pd

    inp = work / f"urls_{n}.parquet"
    pd.DataFrame({"url": urls[:n], "text": [f"a generated photo number {i}" for i in range(n)]}).to_parquet(inp)
    warm_inp = work / "warmup_urls.parquet"   # a different input for the session's warm-up run
    pd.DataFrame({"url": urls[:WARMUP], "text": [f"warm-up photo {i}" for i in range(WARMUP)]}).to_parquet(warm_inp)
    return inp, warm_inp


def compare(work: Path, sizes: tuple[int, ...], images: list[Path], rounds_small: int = 2,
            with_engine: bool = True, rounds_large: int = 1) -> tuple[list[dict], dict]:
    """img2dataset, the fresh command and the running session side by side at each size (and the
    shard engine at the smallest). Rounds alternate the tools' order. Shard size = n / 8."""
    from tests.gen.image_server import ImageServer

    exe = ensure_img2dataset(work)
    env = clean_env()
    figures: list[dict] = []
    raw: dict = {}
    # HTTP/1.1 server: img2dataset (urllib) sends Connection: close and gets one connection per
    # request, as from any web server; our fetcher keeps connections alive
    with ImageServer(latency=(0.02, 0.05), keep_alive=True) as server:
        urls = register(server, images, max(sizes))
        # The local profile's class-data-sharing archive is made by the first command on a machine
        # (at its exit): one untimed fresh command first, so every timed one finds it, as all but
        # the first command on a machine do. Its time is reported (what the first command pays).
        _, warm_inp = _inputs(work, urls, WARMUP)
        raw["archive_priming"] = _measure_tool("spark", work, "prime", exe, warm_inp, WARMUP, warm_inp, env)
        for n in sizes:
            shard_size = max(1, n // 8)
            inp, warm_inp = _inputs(work, urls, n)
            rounds = rounds_small if n <= 2000 else rounds_large
            tools = ["img2dataset", "spark", "session"] + (["engine"] if with_engine and n == min(sizes) else [])
            results: dict[str, list[dict]] = {t: [] for t in tools}
            for rnd in range(rounds):
                order = tools if rnd % 2 == 0 else list(reversed(tools))
                for name in order:
                    results[name].append(_measure_tool(name, work, f"{name}_{n}_{rnd}", exe, inp, shard_size,
                                                       warm_inp, env))
            raw[n] = results
            figures += _size_figures(n, rounds, results)
    prime = raw["archive_priming"]
    figures.append({"name": "first fresh command on a machine (makes the JVM class archive)",
                    "value": round(prime["seconds"], 1), "unit": "s", "peer": "", "peer_value": None,
                    "ratio": None, "goal": "info",
                    "note": f"{WARMUP} URLs; an archive already present (spark.class_archive=auto, temp dir) is "
                            "reused, so this is the cost of a fresh one only when it was missing"})
    return figures, raw


def _size_figures(n: int, rounds: int, results: dict) -> list[dict]:
    def best(name):
        return max(results[name], key=lambda m: m["images_per_s"])

    i2d, spark, session = best("img2dataset"), best("spark"), best("session")
    common = (f"{n} URLs, 20-50 ms latency, 10% failures, {PROCESSES} processes x {THREADS} threads, "
              f"256 border jpg q95, best of {rounds}; 2-core machine shared with other jobs")
    peer = f"img2dataset {I2D_VERSION}"
    figs = [
        {"name": f"throughput at {n} URLs, fresh clipcrawl download command vs img2dataset",
         "value": round(spark["images_per_s"], 1), "unit": "rows/s", "peer": peer,
         "peer_value": round(i2d["images_per_s"], 1), "ratio": round(spark["images_per_s"] / i2d["images_per_s"], 2),
         "goal": ">= 1.5 at 10000", "note": f"wall time of both whole commands, JVM start included; {common}; "
         f"successes ours {spark['ok']} vs {i2d['ok']}; our phases {spark.get('phase_seconds')}; "
         f"ours {spark['seconds']:.1f}s vs {i2d['seconds']:.1f}s"},
        {"name": f"throughput at {n} URLs, stage on a running session vs img2dataset",
         "value": round(session["images_per_s"], 1), "unit": "rows/s", "peer": f"{peer} (whole command)",
         "peer_value": round(i2d["images_per_s"], 1),
         "ratio": round(session["images_per_s"] / i2d["images_per_s"], 2), "goal": ">= 1.5",
         "note": f"download.run on a SparkSession started and warmed by a {WARMUP}-URL download; phases "
                 f"{session.get('phase_seconds')}; {common}; successes {session['ok']}"},
        {"name": f"throughput within the shard window at {n} URLs, fresh command vs img2dataset",
         "value": round(spark["rows"] / spark["shard_window_s"], 1), "unit": "rows/s", "peer": peer,
         "peer_value": round(i2d["rows"] / i2d["shard_window_s"], 1),
         "ratio": round((spark["rows"] / spark["shard_window_s"]) / (i2d["rows"] / i2d["shard_window_s"]), 2),
         "goal": "info", "note": "rows / (last shard end - first shard start) from both tools' per-shard stats: "
                                 "no startup, no planning"},
        {"name": f"peak memory at {n} URLs, fresh command vs img2dataset", "value": round(spark["peak_rss_mb"]),
         "unit": "MB", "peer": peer, "peer_value": round(i2d["peak_rss_mb"]),
         "ratio": round(spark["peak_rss_mb"] / i2d["peak_rss_mb"], 2), "goal": "<= 1.0",
         "note": "process-tree RSS (psutil, 50 ms samples); ours includes the JVM (driver.memory=512m) and "
                 "its Python workers"},
        {"name": f"peak memory at {n} URLs, running session vs img2dataset", "value": round(session["peak_rss_mb"]),
         "unit": "MB", "peer": peer, "peer_value": round(i2d["peak_rss_mb"]),
         "ratio": round(session["peak_rss_mb"] / i2d["peak_rss_mb"], 2), "goal": "<= 1.0",
         "note": "process-tree RSS of the whole child (session start, warm-up and timed run)"},
    ]
    if "engine" in results:
        engine = best("engine")
        figs += [
            {"name": f"throughput at {n} URLs, shard engine vs img2dataset", "value": round(engine["images_per_s"], 1),
             "unit": "rows/s", "peer": peer, "peer_value": round(i2d["images_per_s"], 1),
             "ratio": round(engine["images_per_s"] / i2d["images_per_s"], 2), "goal": ">= 1.5",
             "note": f"udfs.download.download_worker in a 2-process pool, no Spark; successes {engine['ok']}"},
            {"name": f"peak memory at {n} URLs, shard engine vs img2dataset", "value": round(engine["peak_rss_mb"]),
             "unit": "MB", "peer": peer, "peer_value": round(i2d["peak_rss_mb"]),
             "ratio": round(engine["peak_rss_mb"] / i2d["peak_rss_mb"], 2), "goal": "<= 1.0", "note": "process-tree RSS"},
        ]
    ws = spark.get("worker_seconds", {})
    parts = ("network", "decode_wait", "decode", "resize", "encode", "write")   # decode_wait: for a decode slot
    busy = sum(v for k, v in ws.items() if k in parts)
    if busy:
        where = ", ".join(f"{k} {100 * ws.get(k, 0) / busy:.0f}%" for k in parts)
        figs.append({"name": f"where the time goes at {n} URLs (fresh command)", "value": round(busy, 1),
                     "unit": "thread-s", "peer": "", "peer_value": None, "ratio": None, "goal": "",
                     "note": f"summed over fetch threads: {where}"})
    return figs


# --- levers: each one off vs all on, shard engine, alternated ------------------------------------

DNS_DELAY = 0.03      # an uncached recursive lookup (the stub resolver sleeps this long)
LEVER_HOSTS = 16


def _delayed_resolver(host, port):
    # bench host names mean this machine; the delay stands for a recursive DNS query
    if host.endswith(".bench.test"):
        time.sleep(DNS_DELAY)
        return ["127.0.0.1"]
    raise OSError(f"bench resolver: unexpected host {host}")


def _lever_shard(shard, rows, section, out):
    from udfs.download.download_worker import download_shard

    return download_shard(shard, rows, section, out, resolver=_delayed_resolver)


def levers(work: Path, images: list[Path], n: int = 2000, rounds: int = 2) -> list[dict]:
    """The shard engine (2 processes x 32 threads) over `n` URLs spread over 16 host names (stub
    resolver with DNS_DELAY per lookup -> 127.0.0.1) on the keep-alive server: everything on, then
    each lever off, in alternating order; median seconds. Also the fetch-only (no decode) time of
    keep-alive vs one connection per request, with the server's connection counts."""
    import random
    import statistics
    from multiprocessing import Pool

    from spark_jobs.config import load_config
    from tests.gen.image_server import ImageServer
    from udfs.download.download_worker import make_key

    work.mkdir(parents=True, exist_ok=True)
    variants = {
        "all levers on": [],
        "DNS cache off": ["download.dns_cache_hosts=0"],
        "keep-alive off": ["download.keep_alive=false"],
        "per-host cap off": ["download.per_host_concurrency=0"],
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    conns: dict[str, int] = {}
    shard_size = n // 8
    with ImageServer(latency=(0.02, 0.05), keep_alive=True) as server:
        paths = [u.split(str(server.port), 1)[1] for u in register(server, images, n)]
        urls = [f"http://h{i % LEVER_HOSTS}.bench.test:{server.port}{p}" for i, p in enumerate(paths)]
        random.Random(11).shuffle(urls)
        for rnd in range(rounds):
            names = list(variants) if rnd % 2 == 0 else list(reversed(variants))
            for label in names:
                out = work / "out_levers"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                sets = [*download_sets(shard_size), "download.robots_txt=false", "download.tdmrep=false",
                        f"download.host_slots_dir={work / 'slots'}", *variants[label]]
                section = load_config("local", overrides=sets).section("download")
                shards: dict[int, list[dict]] = {}
                for rank, url in enumerate(urls):
                    shard = rank // shard_size
                    shards.setdefault(shard, []).append({"key": make_key(shard, rank % shard_size, 4), "url": url,
                                                         "text": f"photo {rank}", "uid": None, "page_url": None})
                before = sum(server.connections_by_host().values())
                with Pool(PROCESSES) as pool:
                    t0 = time.perf_counter()
                    stats = pool.starmap(_lever_shard, [(s, r, section, str(out)) for s, r in sorted(shards.items())])
                    seconds = time.perf_counter() - t0
                conns[label] = sum(server.connections_by_host().values()) - before
                ok = sum(st["successes"] for st in stats)
                times[label].append(seconds)
                print(f"   lever {label} round {rnd}: {ok} ok in {seconds:.2f}s, {conns[label]} connections",
                      flush=True)
    base = statistics.median(times["all levers on"])
    figs = []
    for label in variants:
        if label == "all levers on":
            continue
        t = statistics.median(times[label])
        figs.append({"name": f"lever: {label} vs all on (shard engine)", "value": round(t, 2), "unit": "s",
                     "peer": "all levers on", "peer_value": round(base, 2), "ratio": round(t / base, 3),
                     "goal": "info (> 1: the lever helps)",
                     "note": f"{n} URLs over {LEVER_HOSTS} host names, stub resolver {DNS_DELAY * 1e3:.0f} ms per "
                             f"lookup, 20-50 ms server latency, {PROCESSES} processes x {THREADS} threads, 8 shards, "
                             f"robots/tdmrep off, median of {rounds} alternated rounds; TCP connections: "
                             f"{conns[label]} vs {conns['all levers on']}; runs {sorted(round(x, 2) for x in times[label])}"
                             f" vs {sorted(round(x, 2) for x in times['all levers on'])}; shared 2-core machine"})
    return figs


def fetch_levers(images: list[Path], n: int = 600, rounds: int = 3) -> list[dict]:
    """Network only (bodies fetched, nothing decoded), so the levers are not hidden under decode
    time: `n` URLs over 16 host names, 32 threads, one Fetcher; stub resolver DNS_DELAY per lookup;
    keep-alive server. All on vs DNS cache off vs keep-alive off, alternated; best of `rounds`."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.gen.image_server import ImageServer
    from udfs.download.fetch import FetchConfig, Fetcher

    variants = {"all on": {}, "DNS cache off": {"dns_cache_hosts": 0}, "keep-alive off": {"keep_alive": False}}
    times: dict[str, list[float]] = {v: [] for v in variants}
    conns: dict[str, int] = {}
    calls: dict[str, int] = {}
    with ImageServer(latency=(0.02, 0.05), keep_alive=True) as server:
        paths = [u.split(str(server.port), 1)[1] for u in register(server, images, n)]
        for rnd in range(rounds):
            for label in (list(variants) if rnd % 2 == 0 else list(reversed(variants))):
                urls = [f"http://h{i % LEVER_HOSTS}.r{rnd}.bench.test:{server.port}{p}" for i, p in enumerate(paths)]
                counter = [0]

                def resolver(host, port, counter=counter):
                    counter[0] += 1
                    return _delayed_resolver(host, port)

                fetcher = Fetcher(FetchConfig(allowed_cidrs="127.0.0.0/8", retries=0, per_domain_concurrency=THREADS,
                                              **variants[label]), resolver=resolver)
                before = sum(server.connections_by_host().values())
                t0 = time.perf_counter()
                with ThreadPoolExecutor(THREADS) as pool:
                    list(pool.map(fetcher.fetch, urls))
                times[label].append(time.perf_counter() - t0)
                fetcher.close()
                conns[label] = sum(server.connections_by_host().values()) - before
                calls[label] = counter[0]
    base = min(times["all on"])
    return [{"name": f"fetch only, {label} vs all on", "value": round(min(times[label]), 3), "unit": "s",
             "peer": "all levers on", "peer_value": round(base, 3), "ratio": round(min(times[label]) / base, 2),
             "goal": "info (> 1: the lever helps)",
             "note": f"{n} URLs over {LEVER_HOSTS} host names, {THREADS} threads, bodies only, stub resolver "
                     f"{DNS_DELAY * 1e3:.0f} ms per lookup, 20-50 ms server latency, best of {rounds} alternated; "
                     f"resolver calls {calls[label]} vs {calls['all on']}, TCP connections {conns[label]} vs "
                     f"{conns['all on']}; runs {sorted(round(x, 2) for x in times[label])}; shared 2-core machine"}
            for label in variants if label != "all on"]


# --- JVM options of the local profile, fresh command ----------------------------------------------

JVM_VARIANTS = {
    "local profile (SerialGC, C1 only)": None,   # conf/local.yaml as it is
    "SerialGC, tiered C1+C2": "-XX:+UseSerialGC -Xms64m -XX:ReservedCodeCacheSize=64m",
    "JVM defaults": "",
}


def jvm_options(work: Path, images: list[Path], n: int = 2000, rounds: int = 2) -> list[dict]:
    """The fresh command with the local profile's driver JVM options and without
    -XX:TieredStopAtLevel=1 (and with no options at all), alternated."""
    import statistics

    from tests.gen.image_server import ImageServer

    exe = ensure_img2dataset(work)
    env = clean_env()
    times: dict[str, list[float]] = {v: [] for v in JVM_VARIANTS}
    peaks: dict[str, list[float]] = {v: [] for v in JVM_VARIANTS}
    with ImageServer(latency=(0.02, 0.05), keep_alive=True) as server:
        urls = register(server, images, n)
        inp, warm_inp = _inputs(work, urls, n)
        for rnd in range(rounds):
            names = list(JVM_VARIANTS) if rnd % 2 == 0 else list(reversed(JVM_VARIANTS))
            for label in names:
                opts = JVM_VARIANTS[label]
                extra = [] if opts is None else [f"spark.conf.spark.driver.extraJavaOptions={opts}"]
                m = _measure_tool("spark", work, f"jvm_{rnd}_{len(times[label])}", exe, inp, max(1, n // 8),
                                  warm_inp, env, extra)
                times[label].append(m["seconds"])
                peaks[label].append(m["peak_rss_mb"])
    base_label = next(iter(JVM_VARIANTS))
    base = statistics.median(times[base_label])
    figs = []
    for label in JVM_VARIANTS:
        t = statistics.median(times[label])
        figs.append({"name": f"fresh command at {n} URLs, driver JVM: {label}", "value": round(t, 2), "unit": "s",
                     "peer": base_label, "peer_value": round(base, 2), "ratio": round(t / base, 3),
                     "goal": "info (> 1: slower than the local profile)",
                     "note": f"median of {rounds} alternated rounds, runs {sorted(round(x, 2) for x in times[label])}; "
                             f"peak RSS {statistics.median(peaks[label]):.0f} MB; shared 2-core machine"})
    return figs


# --- the benchmark -----------------------------------------------------------------------------

SIZES = (2000, 10000)   # 50,000: `python -m bench.bench_download compare 50000` (about 10 minutes)


def run(work: Path, quick: bool) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    images = generate_images(work / "source_images", 400 if quick else 2000)
    sizes = (400,) if quick else SIZES
    figures, raw = compare(work, sizes, images, rounds_small=1 if quick else 2)
    (work / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    figures += levers(work / "levers", images, n=400 if quick else 2000, rounds=1 if quick else 2)
    figures += fetch_levers(images, n=400 if quick else 600, rounds=1 if quick else 3)
    figures += jvm_options(work, images, n=400 if quick else 2000, rounds=1 if quick else 2)
    ta = [fetch_threads_vs_asyncio(register_plain(images[: min(len(images), 600)])) for _ in range(1 if quick else 3)]
    figures.append(
        {"name": "fetch only: threads vs asyncio", "value": round(min(t["threads_s"] for t in ta), 3), "unit": "s",
         "peer": "asyncio + aiohttp", "peer_value": round(min(t["asyncio_s"] for t in ta), 3),
         "ratio": round(min(t["asyncio_s"] for t in ta) / min(t["threads_s"] for t in ta), 2), "goal": ">= 1.0",
         "note": f"{min(len(images), 600)} URLs, bodies only, {THREADS} concurrent, best of {len(ta)}; ratio = "
                 "asyncio time / threads time (both one connection per request, HTTP/1.0 server)"})
    return figures + consent_cost(work / "consent", quick, images)


def register_plain(images: list[Path]):
    """A fresh HTTP/1.0 server for the threads-vs-asyncio comparison; returns its URLs (the server
    stays up until the process ends: a daemon thread)."""
    from tests.gen.image_server import ImageServer

    server = ImageServer(latency=(0.02, 0.05)).start()
    return register(server, images)


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
    from udfs.download.download_worker import download_shard

    return download_shard(shard, rows, section, out, resolver=_bench_resolver)


def _consent_run(urls: list[str], out: Path, shard_size: int, consent: bool, cache_hosts: int) -> dict:
    from multiprocessing import Pool

    from spark_jobs.config import load_config
    from udfs.download.download_worker import make_key

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
    elif len(sys.argv) >= 2 and sys.argv[1] == "fetch-levers":
        print(json.dumps(fetch_levers(generate_images(REPO / "bench" / "work" / "download" / "source_images", 2000)),
                         indent=2))
    elif len(sys.argv) >= 2 and sys.argv[1] in ("compare", "levers", "jvm"):
        # python -m bench.bench_download compare 2000,10000,50000 [--rounds N (above 2,000)] | levers | jvm
        #   -> figures as JSON
        work = REPO / "bench" / "work" / "download"
        work.mkdir(parents=True, exist_ok=True)
        imgs = generate_images(work / "source_images", 2000)
        if sys.argv[1] == "compare":
            given = [a for a in sys.argv[2:3] if not a.startswith("--")]
            sizes = tuple(int(x) for x in (given[0] if given else "2000,10000").split(","))
            rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 1
            figs, raw = compare(work, sizes, imgs, rounds_large=rounds)
            (work / f"compare_{'_'.join(map(str, sizes))}.json").write_text(json.dumps(raw, indent=2, default=str))
        elif sys.argv[1] == "levers":
            figs = levers(work / "levers", imgs)
        else:
            figs = jvm_options(work, imgs)
        print(json.dumps(figs, indent=2))
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

    from udfs.download.fetch import FetchConfig, Fetcher

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
