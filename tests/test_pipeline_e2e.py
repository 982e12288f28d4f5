"""The whole pipeline on the demo sample: counts add up, the report tells the story, and a run
killed in the middle of `download` and of `clip-score` ends with the same subsets as a run that
was never interrupted.

The baseline runs in-process on the shared session; the killed runs are `clipcrawl run`
subprocesses (a SIGKILL of a separate process is the only honest kill), all against one loopback
image server so the URLs, and therefore the SAMPLE_IDs, are the same in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from demo.__main__ import PRESET
from demo.sample import build_sample
from tests.gen.image_server import ImageServer

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

N_IMAGES = 48
TEST_OVERRIDES = [
    "download.shard_size=8",          # several shards, so a kill can land between them
    "download.thread_count=4",
    "clip.batch_size=8",
]


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def sample(server, tmp_path_factory):
    return build_sample(server, tmp_path_factory.mktemp("sample"), n_images=N_IMAGES, n_files=2, seed=7)


def run_config(root: Path, sample: dict, extra=()):
    from demo.__main__ import demo_config

    return demo_config(root, sample["wat_files"], [*TEST_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def baseline(spark, sample, tmp_path_factory):
    from spark_jobs import run as pipeline

    root = tmp_path_factory.mktemp("baseline") / "run"
    cfg = run_config(root, sample)
    summary = pipeline.run(spark, cfg, argparse.Namespace(
        input=None, paths_file=None, root=None, from_stage="wat-extract", to_stage="build-index", force=[]))
    return {"root": root, "cfg": cfg, "summary": summary}


def subset_rows(root: Path, cfg) -> dict[int, tuple]:
    """SAMPLE_ID -> the row's values, over all three subsets."""
    rows: dict[int, tuple] = {}
    for subset in cfg.get("filter.subsets").values():
        folder = root / cfg.get("run.datasets.filter") / subset
        if not folder.exists():
            continue
        table = pads.dataset(str(folder), format="parquet", partitioning="hive").to_table(
            columns=["SAMPLE_ID", "URL", "TEXT", "similarity", "WIDTH", "HEIGHT"])
        for r in table.to_pylist():
            assert r["SAMPLE_ID"] not in rows, f"duplicate SAMPLE_ID {r['SAMPLE_ID']}"
            rows[r["SAMPLE_ID"]] = (subset, r["URL"], r["TEXT"], round(r["similarity"], 4),
                                    r["WIDTH"], r["HEIGHT"])
    return rows


def test_every_stage_ran_and_counts_add_up(baseline, sample):
    from reporting.report import collect

    assert all(s["status"] == "ran" for s in baseline["summary"]["stages"].values())
    cfg = baseline["cfg"]
    facts = collect(str(baseline["root"]), cfg.get("run.datasets"), cfg.get("filter.subsets"))
    for stage in facts["funnel"]:
        assert stage.accounted, f"{stage.stage}: {stage.rows_in} in != {stage.kept} kept + {stage.dropped}"
    funnel = {f.stage: f for f in facts["funnel"]}
    kinds = sample["kinds"]
    # Each planted problem shows up under its reason, with the planted count.
    assert funnel["wat-extract"].dropped.get("alt_too_short", 0) == kinds.get("short_alt", 0)
    assert funnel["dedup"].dropped.get("duplicate", 0) == sample["duplicates"]
    assert facts["download_status"].get("too_small", 0) == kinds.get("tiny", 0)
    assert facts["download_status"].get("opted_out", 0) == kinds.get("opted_out", 0)
    assert funnel["download"].rows_in == sample["distinct_images"] - kinds.get("short_alt", 0)
    assert sum(facts["subsets"].values()) > 0


def test_clip_filter_keeps_matching_captions_and_drops_mismatched(baseline, sample):
    cfg = baseline["cfg"]
    kept_urls = {row[1] for row in subset_rows(baseline["root"], cfg).values()}
    by_kind: dict[str, list[bool]] = {}
    for item in sample["items"]:
        by_kind.setdefault(item["kind"], []).append(item["url"] in kept_urls)
    match_rate = sum(by_kind["match"]) / len(by_kind["match"])
    mismatch_rate = sum(by_kind.get("mismatch", [])) / max(1, len(by_kind.get("mismatch", [])))
    assert match_rate >= 0.7, by_kind
    assert mismatch_rate <= 0.3, by_kind
    assert not any(by_kind.get("tiny", [])) and not any(by_kind.get("opted_out", []))
    assert not any(by_kind.get("missing", []))


def test_english_captions_land_in_laion2b_en_and_its_search_finds_a_red_circle(baseline, sample):
    """The language split on the demo's own captions: laion2B-en holds >= 90% of the English
    matching captions the sample planted (no German or French one), file names are in nolang, and
    the demo's search for "a red circle" in laion2B-en ranks a red circle first."""
    from spark_jobs import search

    cfg = baseline["cfg"]
    subsets = cfg.get("filter.subsets")
    where = {url: subset for subset, url, *_ in subset_rows(baseline["root"], cfg).values()}
    english = [it for it in sample["items"] if it["kind"] == "match" and it["lang"] == "en"]
    in_en = [it for it in english if where.get(it["url"]) == subsets["en"]]
    assert english and len(in_en) >= 0.9 * len(english), [it["alt"] for it in english if it not in in_en]
    foreign = [it["alt"] for it in sample["items"] if it["lang"] != "en" and it["kind"] in ("match", "mismatch")
               and where.get(it["url"]) == subsets["en"]]
    assert not foreign
    files = [it for it in sample["items"] if it["kind"] == "nolang" and it["url"] in where]
    assert all(where[it["url"]] == subsets["nolang"] for it in files)

    hits = search.search(cfg, argparse.Namespace(
        index=str(baseline["root"] / cfg.get("run.datasets.build-index")), subset=subsets["en"],
        text="a red circle", image=None, embedding=None, k=5, modality="image", json=False))
    by_url = {it["url"]: it for it in sample["items"]}
    first = by_url[hits[0]["URL"]]
    assert (first["color"], first["shape"]) == ("red", "circle"), [by_url[h["URL"]]["alt"] for h in hits]


def test_report_renders_every_chart(baseline, tmp_path):
    from reporting.report import build_report

    cfg = baseline["cfg"]
    page = Path(build_report(str(baseline["root"]), cfg.get("run.datasets"), cfg.get("filter.subsets"),
                             str(tmp_path)))
    html = page.read_text()
    for chart in ("funnel", "similarity", "languages", "download_status", "image_sizes", "stage_seconds"):
        assert (tmp_path / f"{chart}.png").stat().st_size > 5000
        assert f"{chart}.png" in html
    assert "unaccounted" not in html


def _cli_run(root: Path, sample: dict, log_path: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "spark_jobs.cli", "run", "--config", str(PRESET),
            "--set", f"storage.root={root}", "--set", f"run.input={json.dumps(sample['wat_files'])}",
            "--set", "download.allowed_cidrs=127.0.0.0/8", "--set", f"dedup.seen={root / '_filters' / 'seen'}",
            "--set", "spark.master=local[2]", "--set", "spark.conf.spark.ui.enabled=false",
            "--set", "spark.conf.spark.ui.showConsoleProgress=false"]
    for item in TEST_OVERRIDES:
        argv += ["--set", item]
    log = open(log_path, "ab")
    return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 400) -> bool:
    """SIGKILL the run's whole process group (JVM and Python workers) once `condition()` holds.
    Returns False if the run finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("run neither finished nor reached the kill point in time")


def test_killed_in_download_and_in_clip_score_then_rerun_matches_uninterrupted(baseline, sample, server,
                                                                                tmp_path):
    cfg = baseline["cfg"]
    root = tmp_path / "run"
    log_path = tmp_path / "run.log"
    images = root / cfg.get("run.datasets.download")
    scored = root / cfg.get("run.datasets.clip-score")

    # 1. Kill in the middle of download: after the first shard is complete, before the last.
    server.latency = (0.15, 0.25)
    try:
        proc = _cli_run(root, sample, log_path)
        killed = _kill_when(proc, lambda: len(list(images.glob("*_complete.json"))) >= 1)
    finally:
        server.latency = (0.0, 0.0)
    assert killed, log_path.read_text()[-3000:]
    done_after_kill = len(list(images.glob("*_complete.json")))
    assert not (images / "_stats" / "stats.json").exists()
    total_shards = len(list((baseline["root"] / cfg.get("run.datasets.download")).glob("*_complete.json")))
    assert 1 <= done_after_kill < total_shards        # some shards done, not all

    # 2. Rerun, kill in the middle of clip-score (its output folder has started, no stats yet).
    proc = _cli_run(root, sample, log_path)
    killed = _kill_when(proc, lambda: scored.exists() and any(scored.rglob("*")) and
                        not (scored / "_stats" / "stats.json").exists())
    assert killed, log_path.read_text()[-3000:]
    assert (images / "_stats" / "stats.json").exists(), "download should have finished on the rerun"

    # 3. Rerun to the end.
    proc = _cli_run(root, sample, log_path)
    assert proc.wait(timeout=600) == 0, log_path.read_text()[-5000:]

    assert subset_rows(root, cfg) == subset_rows(baseline["root"], cfg)
