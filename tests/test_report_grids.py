"""The report's image grids on a small hand-made run layout (no Spark): kept per subset, around
the threshold, dropped by reason, including a reason from a stage between download and filter
(image dedup's `near_duplicate`, found in the download shard by its key) and one without an image
(`opted_out`). The full chain is covered in test_pipeline_e2e on the demo sample."""

from __future__ import annotations

import base64
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reporting import grids
from reporting.report import _table

DATASETS = {"wat-extract": "wat_pairs", "dedup": "pairs_dedup", "download": "images",
            "image-dedup": "images_dedup", "clip-score": "scored", "filter": "dataset", "build-index": "indices"}
SUBSETS = {"en": "laion2B-en", "multi": "laion2B-multi", "nolang": "laion1B-nolang"}
THRESHOLDS = {"en": 0.3, "multi": 0.28, "nolang": 0.28}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}


def key(i: int) -> str:
    return f"00000{i:04d}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """40 downloaded rows: 0-19 kept (en, similarity 0.30-0.49), 20-29 below the threshold
    (0.10-0.29), 30-34 near duplicates, 35-39 opted out (no image in the shard)."""
    root = tmp_path_factory.mktemp("run")
    images = root / "images"
    images.mkdir()
    colour = lambda i: list(COLOURS)[i % 3]  # noqa: E731
    with tarfile.open(images / "00000.tar", "w") as tar:
        for i in range(35):   # opted-out rows never reach the shard
            buf = io.BytesIO()
            Image.new("RGB", (300, 200), COLOURS[colour(i)]).save(buf, "JPEG")
            info = tarfile.TarInfo(f"{key(i)}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    tar_path = str(images / "00000.tar")
    status = ["success"] * 35 + ["opted_out"] * 5
    pq.write_table(pa.table({"key": [key(i) for i in range(40)], "text": [f"a {colour(i)} box {i}" for i in range(40)],
                             "status": status}), images / "00000.parquet")
    dedup = root / "images_dedup"
    dedup.mkdir()
    pq.write_table(pa.table({   # no tar_path: the image is found from the key, in images/00000.tar
        "key": [key(i) for i in range(40)], "text": [f"a {colour(i)} box {i}" for i in range(40)],
        "status": ["success"] * 30 + ["near_duplicate"] * 5 + ["opted_out"] * 5,
        "error_message": [None] * 30 + [f"near duplicate of {key(0)} (distance 3)"] * 5 + ["x-robots"] * 5}),
        dedup / "part-0.parquet")
    kept = root / "dataset" / "laion2B-en"
    kept.mkdir(parents=True)
    pq.write_table(pa.table({"key": [key(i) for i in range(20)], "tar_path": [tar_path] * 20,
                             "TEXT": [f"a {colour(i)} box {i}" for i in range(20)],
                             "similarity": [0.30 + 0.01 * i for i in range(20)], "LANGUAGE": ["en"] * 20,
                             "WIDTH": [300] * 20, "HEIGHT": [200] * 20}), kept / "part-0.parquet")
    below = root / "dataset_rejected" / "status=below_threshold"
    below.mkdir(parents=True)
    pq.write_table(pa.table({"key": [key(i) for i in range(20, 30)], "tar_path": [tar_path] * 10,
                             "text": [f"a {colour(i)} box {i}" for i in range(20, 30)],
                             "score": [0.10 + 0.02 * (i - 20) for i in range(20, 30)],
                             "threshold": [0.3] * 10, "LANGUAGE": ["en"] * 10}), below / "part-0.parquet")
    return root


def build(root, **section):
    reader = lambda path, columns, files_glob=None: _table(path, columns, files_glob)  # noqa: E731
    return grids.report_section(str(root), DATASETS, SUBSETS, THRESHOLDS, section, reader)


def cells(page: str, grid_id: str) -> list[str]:
    body = page.split(f"id='{grid_id}'", 1)[1].split("</div></figcaption></figure></div>", 1)[0]
    return [part.split("'", 1)[0] for part in body.split("<img src='")[1:]]


def captions(page: str, grid_id: str) -> list[str]:
    body = page.split(f"id='{grid_id}'", 1)[1].split("</div></figcaption></figure></div>", 1)[0]
    return [part.split("</div>", 1)[0] for part in body.split("<div class='cap'>")[1:]]


def test_grids_of_every_kind(run):
    page, facts = build(run, max_images_per_grid=6)
    # kept: a sample of 6 of the 20 kept rows of laion2B-en; empty subsets say so
    kept = captions(page, "grid-kept-laion2b-en")
    assert len(kept) == 6 and set(kept) <= {f"a {c} box {i}" for i in range(20) for c in COLOURS}
    assert "id='grid-kept-laion2b-multi'" in page and facts["grids"]["kept:laion2B-multi"]["images"] == 0
    # around the threshold: the 3 lowest kept (0.30, 0.31, 0.32) and the 3 highest dropped (0.28, 0.26, 0.24)
    assert [int(c.rsplit(" ", 1)[1]) for c in captions(page, "grid-threshold-kept")] == [0, 1, 2]
    assert [int(c.rsplit(" ", 1)[1]) for c in captions(page, "grid-threshold-dropped")] == [29, 28, 27]
    # dropped by reason: below_threshold and near_duplicate (from the image-dedup stage) have images,
    # opted_out has none and is only named
    assert len(captions(page, "grid-dropped-below-threshold")) == 6
    near = captions(page, "grid-dropped-near-duplicate")
    assert sorted(int(c.rsplit(" ", 1)[1]) for c in near) == [30, 31, 32, 33, 34]
    assert "near duplicate of 000000000" in page
    assert "grid-dropped-opted-out" not in page and "opted_out (5)" in page
    # thumbnails: JPEG data URIs, at most 128 px, the colour of the shard's image
    for grid_id in ("grid-kept-laion2b-en", "grid-dropped-near-duplicate"):
        for src in cells(page, grid_id):
            img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
            assert img.format == "JPEG" and max(img.size) <= 128 and img.size == (128, 85)


def test_sample_is_seeded_and_sizes_are_capped(run):
    a, _ = build(run, max_images_per_grid=6, seed=3)
    b, _ = build(run, max_images_per_grid=6, seed=3)
    c, _ = build(run, max_images_per_grid=6, seed=4)
    assert a == b
    assert captions(a, "grid-kept-laion2b-en") != captions(c, "grid-kept-laion2b-en")
    small, _ = build(run, max_images_per_grid=4, thumbnail_size=500)   # 500 is capped at 128
    assert len(captions(small, "grid-kept-laion2b-en")) == 4
    assert len(captions(small, "grid-threshold-kept")) == 2
    src = cells(small, "grid-kept-laion2b-en")[0]
    assert max(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size) == 128
    tiny, _ = build(run, max_images_per_grid=4, thumbnail_size=48)
    src = cells(tiny, "grid-kept-laion2b-en")[0]
    assert max(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size) == 48


def test_missing_shard_costs_the_images_not_the_report(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for part in copy.rglob("part-0.parquet"):   # point the copy's tar_path at the copy's shard
        table = pq.read_table(part, partitioning=None)
        if "tar_path" in table.column_names:
            paths = [str(copy / "images" / "00000.tar")] * table.num_rows
            table = table.set_column(table.column_names.index("tar_path"), "tar_path", pa.array(paths))
            pq.write_table(table, part)
    assert build(copy)[1]["thumbnails_read"] > 0
    (copy / "images" / "00000.tar").unlink()
    page, facts = build(copy)
    assert "no image to show" in page and facts["thumbnails_read"] == 0
    assert "below_threshold (10)" in page     # the reason is still named, with its count
