"""End-to-end: the demo pipeline at two sizes, and how time and memory grow per stage.

Each size runs `python -m demo --images N` in a fresh process (its own JVM, image server and
Spark workers) while psutil samples the resident memory of the whole process tree. Stage times
come from the run's `_run/run.json`; each memory sample is attributed to the stage whose
"started"/"finished" log lines bracket it. The figure per stage is the growth exponent
log(t_large / t_small) / log(n_large / n_small): 1.0 is linear, below 1 means fixed costs (JVM,
model loading) still dominate at the small size.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
STAGE_LINE = re.compile(r"^(\d\d:\d\d:\d\d) INFO spark_jobs\.run: ([\w-]+): (started|finished|output complete)")


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_size(n_images: int, work: Path) -> dict:
    out = work / f"demo_{n_images}"
    log_path = work / f"demo_{n_images}.log"
    samples: list[tuple[float, int]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "demo", "--images", str(n_images), "--out", str(out),
                                 "--wat-files", str(max(2, n_images // 2000))],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples.append((time.time(), _tree_rss(ps)))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        stop.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"demo with {n_images} images failed (exit {code}); see {log_path}")
    run = json.loads((out / "run" / "_run" / "run.json").read_text())
    today = datetime.now().date()
    spans: dict[str, list[float]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = STAGE_LINE.match(line)
        if m:
            t = datetime.combine(today, datetime.strptime(m.group(1), "%H:%M:%S").time()).timestamp()
            spans.setdefault(m.group(2), []).append(t)
    stages = {}
    for stage, entry in run["stages"].items():
        span = spans.get(stage, [])
        lo, hi = (min(span), max(span) + 1) if span else (0, 0)
        peak = max((rss for t, rss in samples if lo <= t <= hi), default=0)
        stages[stage] = {"seconds": entry["seconds"], "peak_rss_mb": round(peak / 2**20)}
    return {"images": n_images, "stages": stages, "total_seconds": run["seconds"],
            "peak_rss_mb": round(max(r for _, r in samples) / 2**20)}


def _sizes(quick: bool) -> list[int]:
    """2k, 20k and 100k images (the issue's sizes); CLIPCRAWL_BENCH_PIPELINE_SIZES=a,b,... overrides."""
    env = os.environ.get("CLIPCRAWL_BENCH_PIPELINE_SIZES")
    if env:
        return sorted(int(x) for x in env.split(","))
    return [200, 1000] if quick else [2000, 20000, 100000]


def growth_figures(runs: list[dict]) -> list[dict]:
    """One figure per stage and size step: the time ratio against the size ratio (linear or better
    passes), and one for the whole pipeline's peak memory."""
    figures = []
    for a, b in zip(runs, runs[1:]):
        small, large = a["images"], b["images"]
        size_ratio = large / small
        for stage in a["stages"]:
            if stage not in b["stages"]:
                continue
            ta, tb = a["stages"][stage]["seconds"], b["stages"][stage]["seconds"]
            exponent = math.log(tb / ta) / math.log(size_ratio) if ta and tb else None
            figures.append({
                "name": f"{stage}: seconds at {large} vs {small} images", "value": tb, "unit": "s",
                "peer": f"same stage at {small} images", "peer_value": ta,
                "ratio": round(tb / ta, 2) if ta else None, "goal": f"<= {size_ratio:g} (linear)",
                "note": f"growth exponent {exponent:.2f} (1.0 = linear); peak RSS "
                        f"{a['stages'][stage]['peak_rss_mb']} -> {b['stages'][stage]['peak_rss_mb']} MB"
                        if exponent is not None else "",
            })
        figures.append({
            "name": f"whole pipeline peak memory at {large} vs {small} images", "value": b["peak_rss_mb"],
            "unit": "MB", "peer": f"{small} images", "peer_value": a["peak_rss_mb"],
            "ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2), "goal": "flat (streaming stages)",
            "note": f"total {a['total_seconds']:.0f}s -> {b['total_seconds']:.0f}s",
        })
    return figures


def run(work: Path, quick: bool) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    runs = [run_size(n, work) for n in _sizes(quick)]
    (work / "pipeline_sizes.json").write_text(json.dumps(runs, indent=2))
    return growth_figures(runs)
