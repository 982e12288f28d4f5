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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from demo.__main__ import PRESET
from demo.sample import build_sample
from tests.conftest import run_chain

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

N_IMAGES = 48
TEST_OVERRIDES = [
    "download.shard_size=8",          # several shards, so a kill can land between them
    "download.thread_count=4",
    "clip.batch_size=8",
]


@pytest.fixture(scope="module")
def server(demo_server):
    """The suite's one loopback image server (tests/conftest.py); this module's own sample lives on it."""
    return demo_server


@pytest.fixture(scope="module")
def sample(server, tmp_path_factory):
    return build_sample(server, tmp_path_factory.mktemp("sample"), n_images=N_IMAGES, n_files=2, seed=7)


def run_config(root: Path, sample: dict, extra=()):
    from demo.__main__ import demo_config

    return demo_config(root, sample["wat_files"], [*TEST_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def baseline(spark, sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline") / "run"
    cfg = run_config(root, sample)
    summary = run_chain(spark, cfg)
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


def test_index_ids_carry_the_original_size_for_the_size_filter(baseline):
    cfg = baseline["cfg"]
    root = baseline["root"]
    checked = 0
    for name in cfg.get("filter.subsets").values():
        ids = root / cfg.get("run.datasets.build-index") / name / "ids.parquet"
        if not ids.exists():
            continue
        got = {r["SAMPLE_ID"]: (r["WIDTH"], r["HEIGHT"]) for r in pads.dataset(str(ids)).to_table(
            columns=["SAMPLE_ID", "WIDTH", "HEIGHT"]).to_pylist()}
        want = {sid: (w, h) for sid, (_, _, _, _, w, h) in subset_rows(root, cfg).items() if sid in got}
        assert got == want and all(w and h for w, h in got.values())
        checked += len(got)
    assert checked > 0


class _Grids:
    """The image grids of a report.html, read back with the stdlib HTML parser (not the
    report's own facts): grid id -> its cells (caption, facts line, image data URI)."""

    def __init__(self, page: str):
        from html.parser import HTMLParser

        grids: dict[str, list[dict]] = {}
        empty: set[str] = set()

        class Parser(HTMLParser):
            grid = None
            cell = None
            field = None

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                cls = (a.get("class") or "").split()
                if tag == "div" and "grid" in cls:
                    self.grid = a["id"]
                    grids[self.grid] = []
                elif tag == "p" and "empty" in cls:
                    empty.add(a.get("id"))
                elif tag == "figure" and self.grid:
                    self.cell = {"kind": cls[1], "caption": "", "facts": []}
                    grids[self.grid].append(self.cell)
                elif tag == "img" and self.cell is not None:
                    self.cell["src"], self.cell["alt"] = a["src"], a.get("alt")
                elif tag == "div" and self.cell is not None and cls:
                    self.field = cls[0]

            def handle_data(self, data):
                if self.cell is not None and self.field == "cap":
                    self.cell["caption"] += data
                elif self.cell is not None and self.field == "facts":
                    self.cell["facts"].append(data)

            def handle_endtag(self, tag):
                if tag == "figure":
                    self.cell = None
                elif tag == "div" and self.field:
                    self.field = None

        Parser().feed(page)
        self.grids, self.empty = grids, empty


def _similarity(cell: dict) -> tuple[float, float | None]:
    import re

    found = re.search(r"sim (-?[0-9.]+)(?: \(thr ([0-9.]+)\))?", " ".join(cell["facts"]))
    return float(found.group(1)), (float(found.group(2)) if found.group(2) else None)


def test_report_shows_image_grids_within_the_size_budget(baseline, tmp_path):
    import base64
    import io

    from PIL import Image

    from reporting.report import build_report

    cfg = baseline["cfg"]
    root = baseline["root"]
    subsets = cfg.get("filter.subsets")
    page = Path(build_report(str(root), cfg.get("run.datasets"), subsets, str(tmp_path / "a"),
                             cfg.section("report")))
    grids = _Grids(page.read_text()).grids
    max_images = cfg.get("report.max_images_per_grid")
    thresholds = json.loads((root / cfg.get("run.datasets.filter") / "_stats" / "stats.json").read_text())["thresholds"]

    # Kept, per subset: every subset with rows has a grid with images, all of them its own pairs.
    for name in subsets.values():
        folder = root / cfg.get("run.datasets.filter") / name
        rows = pads.dataset(str(folder), format="parquet").to_table(columns=["TEXT", "similarity"]).to_pylist() \
            if folder.exists() else []
        grid = grids.get(f"grid-kept-{name.lower()}")
        if not rows:
            assert not grid
            continue
        assert grid and 1 <= len(grid) <= max_images, name
        assert len(grid) == min(max_images, len(rows))
        assert {c["caption"] for c in grid} <= {r["TEXT"] for r in rows}
        assert all(c["alt"] == c["caption"] for c in grid)

    # Around the threshold: kept side above its threshold and the lowest such pairs; dropped side
    # below it and the highest; both sides have images (the sample plants mismatched captions).
    kept_side, dropped_side = grids["grid-threshold-kept"], grids["grid-threshold-dropped"]
    assert 1 <= len(kept_side) <= max_images // 2 and 1 <= len(dropped_side) <= max_images // 2
    margins_kept = [s - t for s, t in map(_similarity, kept_side)]
    margins_dropped = [s - t for s, t in map(_similarity, dropped_side)]
    assert all(m >= -1e-9 for m in margins_kept) and all(m < 0 for m in margins_dropped)
    all_kept = []
    for bucket, name in subsets.items():
        folder = root / cfg.get("run.datasets.filter") / name
        if folder.exists():
            sims = pads.dataset(str(folder), format="parquet").to_table(columns=["similarity"]).column(0).to_pylist()
            all_kept += [s - thresholds[bucket] for s in sims]
    close = lambda got, want: len(got) == len(want) and all(abs(a - b) < 1e-3 for a, b in zip(got, want))  # noqa: E731
    assert close(sorted(margins_kept), sorted(all_kept)[:len(kept_side)])
    rejected = pads.dataset(str(root / (cfg.get("run.datasets.filter") + "_rejected")), format="parquet",
                            partitioning="hive").to_table(columns=["status", "score", "threshold"]).to_pylist()
    below = sorted((r["score"] - r["threshold"] for r in rejected if r["status"] == "below_threshold"), reverse=True)
    assert close(sorted(margins_dropped, reverse=True), below[:len(dropped_side)])

    # Dropped, by reason: below_threshold has images; reasons without an image are only named.
    assert 1 <= len(grids["grid-dropped-below-threshold"]) <= max_images
    assert all(c["kind"] == "dropped" for c in grids["grid-dropped-below-threshold"])
    assert "grid-dropped-opted-out" not in grids and "opted_out (" in page.read_text()

    # Every grid that has data shows at least one image; thumbnails are JPEG data URIs <= 128 px.
    for grid_id, cells in grids.items():
        assert cells, grid_id
        for cell in cells[:3]:
            assert cell["src"].startswith("data:image/jpeg;base64,")
            img = Image.open(io.BytesIO(base64.b64decode(cell["src"].split(",", 1)[1])))
            assert max(img.size) <= 128, (grid_id, img.size)

    # Self-contained and small: the page references only files beside it, the folder is < 5 MB.
    total = sum(f.stat().st_size for f in page.parent.iterdir())
    print(f"report folder: {total / 1e6:.2f} MB, report.html {page.stat().st_size / 1e6:.2f} MB")
    assert total < 5_000_000
    assert "http://" not in page.read_text().split("<section id='grids'>", 1)[1]

    # Seeded: a rerun shows the same images; a smaller max_images_per_grid is honoured.
    again = Path(build_report(str(root), cfg.get("run.datasets"), subsets, str(tmp_path / "b"),
                              cfg.section("report")))
    grid_part = lambda p: p.read_text().split("<section id='grids'>", 1)[1]  # noqa: E731
    assert grid_part(again) == grid_part(page)
    small = Path(build_report(str(root), cfg.get("run.datasets"), subsets, str(tmp_path / "c"),
                              {**cfg.section("report"), "max_images_per_grid": 4, "seed": 1}))
    small_grids = _Grids(small.read_text()).grids
    assert all(1 <= len(cells) <= 4 for cells in small_grids.values())
    assert grid_part(small) != grid_part(page)


def test_report_of_an_s3_root_reads_thumbnails_from_the_shards_on_s3(baseline, moto_s3, tmp_path):
    """The baseline run copied to S3 (moto on loopback), its tar_path columns pointing at the S3
    shards as in a real S3 run: the report reads parquet and tar shards through fsspec."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from reporting.report import build_report

    cfg = baseline["cfg"]
    local_root = str(baseline["root"])
    moto_s3.bucket("runs")
    s3_root = "s3://runs/cc-test"
    fs = s3fs.S3FileSystem(**moto_s3.options)
    for path in Path(local_root).rglob("*"):
        if not path.is_file() or "_filters" in path.parts:
            continue
        target = f"runs/cc-test/{path.relative_to(local_root).as_posix()}"
        if path.suffix == ".parquet" and "tar_path" in pq.read_schema(path).names:
            table = pq.read_table(path, partitioning=None)
            col = table.column("tar_path").to_pylist()
            col = [v.replace(local_root, s3_root) if v else v for v in col]
            table = table.set_column(table.schema.get_field_index("tar_path"), "tar_path",
                                     pa.array(col, table.schema.field("tar_path").type))
            with fs.open(target, "wb") as fh:
                pq.write_table(table, fh)
        else:
            fs.put_file(str(path), target)
    subsets = cfg.get("filter.subsets")
    local = Path(build_report(local_root, cfg.get("run.datasets"), subsets, str(tmp_path / "local"),
                              cfg.section("report")))
    remote = Path(build_report(s3_root, cfg.get("run.datasets"), subsets, str(tmp_path / "s3"),
                               cfg.section("report"), moto_s3.options))
    facts = json.loads((remote.parent / "report_facts.json").read_text())
    assert facts["image_grids"]["thumbnails_read"] > 0
    assert [f["kept"] for f in facts["funnel"]] == [
        f["kept"] for f in json.loads((local.parent / "report_facts.json").read_text())["funnel"]]
    # the same images, captions and numbers as the local report (the root is the only difference)
    grid_part = lambda p: p.read_text().split("<section id='grids'>", 1)[1]  # noqa: E731
    assert grid_part(remote) == grid_part(local)


def _cli_run(root: Path, sample: dict, log_path: Path) -> subprocess.Popen:
    """`clipcrawl run` from download to filter (the stages the kill test interrupts and the subsets
    it compares) on a root that already holds the baseline's dedup output."""
    argv = [sys.executable, "-m", "spark_jobs.cli", "run", "--config", str(PRESET), "--from", "download",
            "--to", "filter",
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
    # the runs start at download, from the baseline's dedup output (wat-extract and dedup are not
    # what this test interrupts, and their resume has its own tests)
    dedup = cfg.get("run.datasets.dedup")
    shutil.copytree(baseline["root"] / dedup, root / dedup)

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
