"""End-to-end: the demo pipeline at two sizes, and how time and memory grow per stage.

Each size runs `python -m demo --images N` in a fresh process (its own JVM, image server and
Spark workers) while psutil samples the resident memory of the whole process tree. Stage times
come from the run's `_run/run.json`; each memory sample is attributed to the stage whose
"started"/"finished" log lines bracket it. The figure per stage is the growth exponent
log(t_large / t_small) / log(n_large / n_small): 1.0 is linear, below 1 means fixed costs (JVM,
model loading) still dominate at the small size.

Memory is also split by process, so growth can be told apart from a buffer: the driver JVM's RSS
and, from `jstat -gc` (one sampler JVM outside the measured tree, when the JDK has it), its heap
used vs committed; the demo's own Python process (the driver, which here also runs the loopback
image server holding every image's bytes: O(n) by construction of the bench, not a stage's); and
the Spark Python workers. A JVM whose RSS grows while its used heap stays far below committed is
the heap being grown toward -Xmx (spark.driver.memory) and not given back, not an O(n) buffer.

Measured 2k -> 20k images (one run each, machine shared, load 5-12): tree peak 3347 -> 4841 MB. Of
the +1494 MB, the driver Python gave +544, all of it already there before wat-extract starts (120 ->
618 MB): the image server's bodies, O(n) in the bench harness, present in every stage's figure. The
Python workers gave +909, almost all in clip-score/filter/build-index (clip-score 988 -> 2062 MB,
download 408 -> 531): workers that loaded torch and the model stay alive into the later stages
(the count per size was not recorded). The JVM gave +122 (RSS 918 -> 1040; heap committed
665 -> 848, used at most 518 -> 608): the heap grows while used stays ~70% of committed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

COMPONENTS = ("jvm_rss", "heap_used", "heap_committed", "driver_rss", "workers_rss")

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


def _split_rss(proc: psutil.Process) -> dict:
    """RSS of the tree by kind: the JVM(s), the demo's own (driver) Python process, everything else
    (Spark's Python workers and daemon)."""
    out = {"jvm_rss": 0, "driver_rss": 0, "workers_rss": 0}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
            kind = ("driver_rss" if p.pid == proc.pid else
                    "jvm_rss" if p.name() == "java" else "workers_rss")
        except psutil.Error:
            continue
        out[kind] += rss
    return out


def parse_jstat_gc(header: str, line: str) -> tuple[int, int] | None:
    """(heap used, heap committed) in bytes from one `jstat -gc` header and row (KB columns):
    survivor, eden and old spaces; metaspace is not heap. Columns a collector leaves unset ('-')
    are not needed; None for a row whose heap columns are not numbers."""
    names, values = header.split(), line.split()
    if len(names) != len(values):
        return None
    row = dict(zip(names, values))
    try:
        used = sum(float(row[c]) for c in ("S0U", "S1U", "EU", "OU"))
        committed = sum(float(row[c]) for c in ("S0C", "S1C", "EC", "OC"))
    except (KeyError, ValueError):
        return None
    return int(used * 1024), int(committed * 1024)


class HeapSampler:
    """`jstat -gc PID 1000` as one long-lived process per JVM (a jstat start per sample would cost
    a JVM start each time on this 2-core machine); the latest (used, committed) is kept."""

    def __init__(self):
        self.pid: int | None = None
        self.latest: tuple[int, int] | None = None
        self._proc: subprocess.Popen | None = None

    def follow(self, pid: int | None) -> None:
        if pid == self.pid or shutil.which("jstat") is None:
            return
        self.stop()
        self.pid, self.latest = pid, None
        if pid is None:
            return
        self._proc = subprocess.Popen(["jstat", "-gc", str(pid), "1000"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        header = None
        for line in proc.stdout:
            if header is None or line.split()[:1] == header.split()[:1]:
                header = line
                continue
            parsed = parse_jstat_gc(header, line)
            if parsed and proc is self._proc:
                self.latest = parsed

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._proc = None


def _jvm_pid(proc: psutil.Process) -> int | None:
    try:
        return next((p.pid for p in proc.children(recursive=True) if p.name() == "java"), None)
    except psutil.Error:
        return None


def run_size(n_images: int, work: Path) -> dict:
    out = work / f"demo_{n_images}"
    log_path = work / f"demo_{n_images}.log"
    samples: list[tuple[float, int]] = []
    parts: list[tuple[float, dict]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "demo", "--images", str(n_images), "--out", str(out),
                                 "--wat-files", str(max(2, n_images // 2000))],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        stop = threading.Event()

        heap = HeapSampler()

        def sample():
            while not stop.is_set():
                now = time.time()
                samples.append((now, _tree_rss(ps)))
                split = _split_rss(ps)
                heap.follow(_jvm_pid(ps))
                if heap.latest:
                    split["heap_used"], split["heap_committed"] = heap.latest
                parts.append((now, split))
                stop.wait(0.5)
            heap.stop()

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
        stages[stage] = {"seconds": entry["seconds"], "peak_rss_mb": round(peak / 2**20),
                         **_component_peaks([p for t, p in parts if lo <= t <= hi])}
    return {"images": n_images, "stages": stages, "total_seconds": run["seconds"],
            "peak_rss_mb": round(max(r for _, r in samples) / 2**20),
            **_component_peaks([p for _, p in parts])}


def _component_peaks(splits: list[dict]) -> dict:
    """The peak of each component over the samples, in MB (each may peak at its own moment)."""
    return {f"peak_{c}_mb": round(max(s[c] for s in splits if c in s) / 2**20)
            for c in COMPONENTS if any(c in s for s in splits)}


def memory_breakdown(a: dict, b: dict) -> str:
    """'jvm_rss 900->1400, heap_used 300->320, ...' in MB between two sizes (missing ones left out)."""
    names = {"jvm_rss": "JVM RSS", "heap_used": "heap used", "heap_committed": "heap committed",
             "driver_rss": "driver Python", "workers_rss": "Python workers"}
    return ", ".join(f"{names[c]} {a[f'peak_{c}_mb']}->{b[f'peak_{c}_mb']}" for c in COMPONENTS
                     if f"peak_{c}_mb" in a and f"peak_{c}_mb" in b)


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
                "note": (f"growth exponent {exponent:.2f} (1.0 = linear); peak RSS "
                         f"{a['stages'][stage]['peak_rss_mb']} -> {b['stages'][stage]['peak_rss_mb']} MB"
                         + _breakdown_note(a["stages"][stage], b["stages"][stage])
                         if exponent is not None else ""),
            })
        figures.append({
            "name": f"whole pipeline peak memory at {large} vs {small} images", "value": b["peak_rss_mb"],
            "unit": "MB", "peer": f"{small} images", "peer_value": a["peak_rss_mb"],
            "ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2), "goal": "flat (streaming stages)",
            "note": f"total {a['total_seconds']:.0f}s -> {b['total_seconds']:.0f}s" + _breakdown_note(a, b),
        })
    return figures


def _breakdown_note(a: dict, b: dict) -> str:
    text = memory_breakdown(a, b)
    return f" (peaks in MB: {text})" if text else ""


def run(work: Path, quick: bool) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    runs = [run_size(n, work) for n in _sizes(quick)]
    (work / "pipeline_sizes.json").write_text(json.dumps(runs, indent=2))
    return growth_figures(runs)
