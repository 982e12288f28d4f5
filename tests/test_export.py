"""`clipcrawl export` on a real chain: the demo sample runs wat-extract -> dedup -> download ->
clip-score (the bundled tiny CLIP) -> filter once for the module, with `run.export` naming the
English subset, and the tests read the exported shards with open_clip's own training reader,
Hugging Face `datasets` (where it can be installed), and plain tarfile / pyarrow.

Expected values come from the subset parquet and the download shards, read here independently
(pyarrow, tarfile), never from the export's own stats.
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from demo.sample import build_sample
from tests.gen.image_server import ImageServer
from udfs.export import layout, locate, order, shards

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "tests" / "fixtures" / "tiny_clip"
pytestmark = pytest.mark.slow
SHARD_SIZE = 2


@pytest.fixture(scope="module")
def chain(spark, tmp_path_factory):
    """The pipeline up to filter on a 48-image sample, then run.export = [the English subset]."""
    from demo.__main__ import demo_config
    from spark_jobs import run as pipeline

    root = tmp_path_factory.mktemp("export_chain") / "run"
    with ImageServer() as server:
        sample = build_sample(server, tmp_path_factory.mktemp("export_sample"), n_images=48, n_files=2, seed=11)
        cfg = demo_config(root, sample["wat_files"], [
            "download.shard_size=8", "download.thread_count=4", "clip.batch_size=8",
            "filter.language_detector=lingua-low", f"export.shard_size={SHARD_SIZE}"])
        en = cfg.get("filter.subsets.en")
        cfg = cfg.with_overrides([f"run.export={json.dumps([en])}"])
        summary = pipeline.run(spark, cfg, argparse.Namespace(
            input=None, paths_file=None, root=None, from_stage="wat-extract", to_stage="filter", force=[]))
    dataset = root / cfg.get("run.datasets.filter")
    return {"root": root, "cfg": cfg, "summary": summary, "dataset": dataset, "en": en,
            "multi": cfg.get("filter.subsets.multi"), "export": root / cfg.get("run.datasets.export") / en}


def subset_table(folder: Path) -> list[dict]:
    """The subset's rows in its own order (files by name, rows in file order)."""
    rows = []
    for path in sorted(glob.glob(str(folder / "*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def stored_images(rows: list[dict]) -> dict[str, bytes]:
    """key -> the image bytes the download stage stored in its shard (tarfile, not our reader)."""
    out = {}
    for tar_path in sorted({r["tar_path"] for r in rows}):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext not in ("txt", "json"):
                    out[key] = tar.extractfile(m).read()
    return out


def stored_hashes(chain) -> dict[str, str]:
    """key -> stored_sha256 of every success row of the download metadata (pyarrow, not Spark)."""
    out = {}
    for path in sorted(glob.glob(str(chain["root"] / chain["cfg"].get("run.datasets.download") / "*.parquet"))):
        for r in pq.read_table(path, columns=["key", "status", "sha256", "stored_sha256"]).to_pylist():
            if r["status"] == "success":
                out[r["key"]] = r
    return out


def read_export(folder: Path) -> list[dict]:
    """Every sample of the exported tars, in shard order: {key: ..., ext: bytes}."""
    samples = []
    for path in sorted(glob.glob(str(folder / "[0-9]*.tar"))):
        with tarfile.open(path) as tar:
            current = None
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if current is None or current["key"] != key:
                    current = {"key": key, "shard": Path(path).name}
                    samples.append(current)
                current[ext] = tar.extractfile(m).read()
    return samples


def run_export(spark, cfg, argv: list[str]) -> dict:
    from spark_jobs import export

    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export.run(spark, cfg, parser.parse_args(argv))


def test_run_export_writes_every_subset_row_with_its_stored_bytes(chain):
    assert chain["summary"]["exports"][chain["en"]]["status"] == "ran"
    rows = subset_table(chain["dataset"] / chain["en"])
    assert len(rows) > SHARD_SIZE, "the sample should give the English subset several shards"
    samples = read_export(chain["export"])
    assert sorted(s["key"] for s in samples) == sorted(r["key"] for r in rows)
    stored = stored_images(rows)
    recorded = stored_hashes(chain)
    by_key = {r["key"]: r for r in rows}
    for s in samples:
        row = by_key[s["key"]]
        # the image is the stored download bytes, not a re-encode: its hash is the one download
        # recorded for the bytes it wrote (the original-bytes sha256 differs: download resized them)
        digest = hashlib.sha256(s["jpg"]).hexdigest()
        assert digest == recorded[s["key"]]["stored_sha256"]
        assert digest == hashlib.sha256(stored[s["key"]]).hexdigest()
    assert any(recorded[s["key"]]["sha256"] != recorded[s["key"]]["stored_sha256"] for s in samples)
    for s in samples:
        row = by_key[s["key"]]
        assert s["txt"].decode() == row["TEXT"]
        meta = json.loads(s["json"])
        assert meta == {c: row[c] for c in layout.LAION_COLUMNS}
    sizes = json.loads((chain["export"] / "sizes.json").read_text())
    tars = sorted(Path(p).name for p in glob.glob(str(chain["export"] / "[0-9]*.tar")))
    assert sorted(sizes) == tars == [f"{i:05d}.tar" for i in range(len(tars))]
    assert sizes == dict(Counter(s["shard"] for s in samples))
    assert all(n == SHARD_SIZE for name, n in sizes.items() if name != tars[-1])
    info = json.loads((chain["export"] / "_info.json").read_text())
    assert info["total_samples"] == len(rows) and info["subset"] == chain["en"]
    assert f"{{00000..{len(tars) - 1:05d}}}.tar" in info["open_clip"]
    manifest = pq.read_table(str(chain["export"] / "manifest")).to_pylist()
    assert {m["key"]: m["shard_file"] for m in manifest} == {s["key"]: s["shard"] for s in samples}


def test_open_clip_reader_yields_the_subset(chain):
    """open_clip_train.data.get_wds_dataset (eval mode: every sample once) with the tiny model's
    preprocessing and tokenizer yields the subset's rows: same count, same images, same captions."""
    import open_clip
    import torch
    from open_clip_train.data import get_dataset_size, get_wds_dataset
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{MODEL}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{MODEL}")
    info = json.loads((chain["export"] / "_info.json").read_text())
    pattern = f"{chain['export']}/{{00000..{info['shards'] - 1:05d}}}.tar"
    args = argparse.Namespace(val_data=pattern, val_num_samples=None, batch_size=4, workers=0,
                              train_data=None, dataset_resampled=False, seed=0, world_size=1)
    loader = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer).dataloader
    got = Counter()
    for images, texts in loader:
        for img, tok in zip(images, texts):
            got[(hashlib.sha256(img.numpy().tobytes()).hexdigest(), tuple(tok.tolist()))] += 1

    rows = subset_table(chain["dataset"] / chain["en"])
    stored = stored_images(rows)
    want = Counter()
    for r in rows:
        img = preprocess(Image.open(io.BytesIO(stored[r["key"]])).convert("RGB"))
        tok = tokenizer(r["TEXT"])[0]
        want[(hashlib.sha256(img.numpy().tobytes()).hexdigest(), tuple(tok.tolist()))] += 1
    assert sum(got.values()) == len(rows)
    assert got == want
    assert isinstance(img, torch.Tensor)
    # the training path's sample count comes from our sizes.json when --train-num-samples is omitted
    assert get_dataset_size(pattern) == (len(rows), info["shards"])


def test_same_seed_gives_identical_shards_and_no_shuffle_keeps_subset_order(spark, chain, tmp_path):
    cfg, dataset, multi = chain["cfg"], str(chain["dataset"]), chain["multi"]
    rows = subset_table(chain["dataset"] / multi)
    assert len(rows) >= 4, "the sample should have a multilingual subset"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_export(spark, cfg, ["--dataset", dataset, "--subset", multi, "--output", str(a)])
    run_export(spark, cfg, ["--dataset", dataset, "--subset", multi, "--output", str(b)])
    tars = sorted(p.name for p in a.glob("[0-9]*.tar"))
    assert tars and tars == sorted(p.name for p in b.glob("[0-9]*.tar"))
    for name in tars:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    shuffled = [s["key"] for s in read_export(a)]
    run_export(spark, cfg, ["--dataset", dataset, "--subset", multi, "--output", str(c), "--no-shuffle"])
    in_order = [s["key"] for s in read_export(c)]
    assert in_order == [r["key"] for r in rows]
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    run_export(spark, cfg, ["--dataset", dataset, "--subset", multi, "--output", str(b), "--shuffle-seed", "7"])
    assert [s["key"] for s in read_export(b)] != shuffled


def test_where_and_limit(spark, chain, tmp_path):
    cfg, en = chain["cfg"], chain["en"]
    rows = subset_table(chain["dataset"] / en)
    cut = sorted(r["similarity"] for r in rows)[len(rows) // 2]
    want = sorted(r["key"] for r in rows if r["similarity"] >= cut and r["WIDTH"] >= 100)
    assert 0 < len(want) < len(rows)
    stats = run_export(spark, cfg, ["--dataset", str(chain["root"]), "--subset", en, "--output", str(tmp_path / "w"),
                                    "--where", f"similarity >= {cut!r} AND WIDTH >= 100"])
    assert sorted(s["key"] for s in read_export(tmp_path / "w")) == want
    assert stats["output_rows"] == len(want)
    # --dataset may also be the subset folder itself
    run_export(spark, cfg, ["--dataset", str(chain["dataset"] / en), "--output", str(tmp_path / "l"), "--limit", "3"])
    limited = read_export(tmp_path / "l")
    assert len(limited) == 3 and {s["key"] for s in limited} <= {r["key"] for r in rows}
    assert json.loads((tmp_path / "l" / "sizes.json").read_text()) == {"00000.tar": SHARD_SIZE, "00001.tar": 3 - SHARD_SIZE}
    # a predicate nothing passes: an empty, complete export
    empty = run_export(spark, cfg, ["--dataset", str(chain["dataset"]), "--subset", en, "--output", str(tmp_path / "e"),
                                    "--where", "similarity > 2"])
    assert empty["output_rows"] == 0 and empty["shards"] == 0 and not list((tmp_path / "e").glob("*.tar"))
    assert json.loads((tmp_path / "e" / "sizes.json").read_text()) == {}


def test_bad_where_is_a_one_line_error_before_any_task(chain, tmp_path, capsys):
    from spark_jobs import cli

    out = tmp_path / "never"
    for predicate in ("similarity >=", "no_such_column > 1", "WIDTH"):
        code = cli.main(["export", "--dataset", str(chain["dataset"]), "--output", str(out), "--where", predicate,
                         "--set", "spark.master=local[2]"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("clipcrawl export: error: --where") and "\n" not in err, err
        assert not out.exists()
    code = cli.main(["export", "--dataset", str(chain["dataset"]), "--subset", "laion9B-xx", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "subset 'laion9B-xx' not found" in err and "\n" not in err


def test_missing_image_is_counted_and_listed(spark, chain, tmp_path):
    """Rows whose image is not in their source shard (a key the tar lacks, a tar that is gone)."""
    en = chain["en"]
    table = pq.read_table(glob.glob(str(chain["dataset"] / en / "*.parquet"))[0])
    rows = table.to_pylist()
    gone_key = dict(rows[0], key="99999" + rows[0]["key"][5:], SAMPLE_ID=1, hash=1)
    gone_tar = dict(rows[0], key="99998" + rows[0]["key"][5:], tar_path=str(tmp_path / "nope" / "00042.tar"),
                    SAMPLE_ID=2, hash=2)
    folder = tmp_path / "subset" / en
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows + [gone_key, gone_tar], schema=table.schema), folder / "part-0.parquet")
    stats = run_export(spark, chain["cfg"], ["--dataset", str(tmp_path / "subset"), "--subset", en,
                                             "--output", str(tmp_path / "out")])
    assert stats["input_rows"] == len(rows) + 2 and stats["output_rows"] == len(rows)
    assert stats["by_status"] == {"success": len(rows), "missing_image": 2} and stats["balanced"]
    listed = {m["key"]: m["error_message"] for m in stats["missing_images"]}
    assert set(listed) == {gone_key["key"], gone_tar["key"]}
    assert "not found" in listed[gone_tar["key"]]
    manifest = {m["key"]: m for m in pq.read_table(str(tmp_path / "out" / "manifest")).to_pylist()}
    assert manifest[gone_key["key"]]["status"] == "missing_image" and manifest[gone_key["key"]]["shard"] is None
    # the parts the shard tasks wrote are the declared dataset, as Spark reads it
    from spark_jobs import datasets
    from spark_jobs.schemas import EXPORT_MANIFEST

    read = datasets.read_dataset(spark, str(tmp_path / "out" / "manifest"), EXPORT_MANIFEST)
    assert read.count() == len(rows) + 2 and read.where("status = 'success' AND shard IS NOT NULL").count() == len(rows)
    assert len(read_export(tmp_path / "out")) == len(rows)
    # the missing rows were counted into the plan (their shards hold fewer samples), but the files
    # that describe the export count the samples written
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert sum(sizes.values()) == len(rows) == info["total_samples"]
    assert len(sizes) == -(-(len(rows) + 2) // SHARD_SIZE) == info["shards"]
    assert f"--train-num-samples {len(rows)} " in info["open_clip"]
    for name, n in sizes.items():
        with tarfile.open(tmp_path / "out" / name) as tar:
            assert len([m for m in tar.getmembers() if m.name.endswith(".json")]) == n
    # and a rerun writes the same bytes
    run_export(spark, chain["cfg"], ["--dataset", str(tmp_path / "subset"), "--subset", en,
                                     "--output", str(tmp_path / "again")])
    for name in sizes:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def download_metadata(chain) -> list[dict]:
    folder = chain["root"] / chain["cfg"].get("run.datasets.download")
    return [r for path in sorted(glob.glob(str(folder / "*.parquet"))) for r in pq.read_table(path).to_pylist()]


def test_download_records_where_each_image_lies_and_the_subset_carries_it(chain):
    """image_offset / image_size of every success row are the data offset and size tarfile reads
    for KEY.jpg in its shard; other rows have none; the subset rows carry download's values."""
    meta = download_metadata(chain)
    members = {}
    for tar_path in sorted(glob.glob(str(chain["root"] / chain["cfg"].get("run.datasets.download") / "*.tar"))):
        with tarfile.open(tar_path) as tar:
            members.update({m.name: (m.offset_data, m.size) for m in tar.getmembers()})
    success = [r for r in meta if r["status"] == "success"]
    assert success and len(success) < len(meta)
    for r in meta:
        got = (r["image_offset"], r["image_size"])
        assert got == (members[r["key"] + ".jpg"] if r["status"] == "success" else (None, None)), r["key"]
    recorded = {r["key"]: (r["image_offset"], r["image_size"]) for r in success}
    subset = subset_table(chain["dataset"] / chain["en"])
    assert subset and all((r["image_offset"], r["image_size"]) == recorded[r["key"]] for r in subset)


def _subset_copy(chain, folder: Path, change) -> Path:
    """The en subset rewritten by `change` (a pyarrow Table -> Table) under folder/<en>."""
    en = chain["en"]
    (folder / en).mkdir(parents=True)
    for path in sorted(glob.glob(str(chain["dataset"] / en / "*.parquet"))):
        pq.write_table(change(pq.read_table(path)), folder / en / Path(path).name)
    return folder


def test_recorded_offsets_and_tar_headers_give_the_same_shards(spark, chain, tmp_path):
    """An export from download's recorded offsets and one of the same subset without them (a
    subset from before they were recorded: the tars' headers are read) write identical shards."""
    en = chain["en"]
    old = _subset_copy(chain, tmp_path / "old", lambda t: t.drop_columns(["image_offset", "image_size"]))
    a = run_export(spark, chain["cfg"], ["--dataset", str(chain["dataset"]), "--subset", en, "--output", str(tmp_path / "a")])
    b = run_export(spark, chain["cfg"], ["--dataset", str(old), "--subset", en, "--output", str(tmp_path / "b")])
    assert (a["image_offsets"], b["image_offsets"]) == ("recorded", "tar headers")
    tars = sorted(p.name for p in (tmp_path / "a").glob("[0-9]*.tar"))
    assert tars and tars == sorted(p.name for p in (tmp_path / "b").glob("[0-9]*.tar"))
    for name in tars:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_stale_recorded_offsets_are_found_in_the_tar_or_counted_missing(spark, chain, tmp_path):
    """Source tars rewritten after download (as a takedown does): members in another order, one
    sample removed. The recorded offsets no longer point at the images; export finds each moved
    image in its tar's headers (same bytes as stored) and counts the removed one missing."""
    en = chain["en"]
    rows = subset_table(chain["dataset"] / en)
    stored = stored_images(rows)
    gone = rows[0]["key"]
    moved = {}
    for src in sorted({r["tar_path"] for r in rows}):
        dst = tmp_path / "tars" / Path(src).name
        dst.parent.mkdir(exist_ok=True)
        with tarfile.open(src) as tar, tarfile.open(dst, "w") as out:
            for m in reversed(tar.getmembers()):
                if not m.name.startswith(gone + "."):
                    out.addfile(m, tar.extractfile(m))
        moved[src] = str(dst)

    def retarget(table):
        paths = pa.array([moved[p] for p in table.column("tar_path").to_pylist()], pa.string())
        return table.set_column(table.schema.get_field_index("tar_path"), "tar_path", paths)

    subset = _subset_copy(chain, tmp_path / "subset", retarget)
    stats = run_export(spark, chain["cfg"], ["--dataset", str(subset), "--subset", en, "--output", str(tmp_path / "out")])
    assert stats["image_offsets"] == "recorded" and stats["balanced"]
    assert stats["by_status"] == {"success": len(rows) - 1, "missing_image": 1}
    assert [m["key"] for m in stats["missing_images"]] == [gone]
    assert "not in source shard" in stats["missing_images"][0]["error_message"]
    samples = read_export(tmp_path / "out")
    assert sorted(s["key"] for s in samples) == sorted(r["key"] for r in rows if r["key"] != gone)
    assert all(s["jpg"] == stored[s["key"]] for s in samples)


def test_resume_skips_complete_shards_and_rewrites_the_rest(spark, chain, tmp_path):
    cfg, dataset, en = chain["cfg"], str(chain["dataset"]), chain["en"]
    out = tmp_path / "r"
    first = run_export(spark, cfg, ["--dataset", dataset, "--subset", en, "--output", str(out)])
    assert first["shards"] >= 2 and first["shards_written"] == first["shards"]
    original = {p.name: p.read_bytes() for p in out.glob("[0-9]*.tar")}
    kept_mtime = (out / "00000.tar").stat().st_mtime_ns
    # the state a run killed while writing shard 1 leaves: no marker for it, a temporary file, no final files
    (out / "_markers" / "00001.json").unlink()
    (out / "00001.tar").unlink()
    (out / ".00001.tar.deadbeef.tmp").write_bytes(b"partial")
    for name in ("sizes.json", "_info.json"):
        (out / name).unlink()
    shutil.rmtree(out / "_stats")
    again = run_export(spark, cfg, ["--dataset", dataset, "--subset", en, "--output", str(out)])
    assert again["shards_written"] == 1 and again["shards_skipped"] == first["shards"] - 1
    assert (out / "00000.tar").stat().st_mtime_ns == kept_mtime
    assert {p.name: p.read_bytes() for p in out.glob("[0-9]*.tar")} == original
    # another plan (here: another seed) does not trust the old markers
    third = run_export(spark, cfg, ["--dataset", dataset, "--subset", en, "--output", str(out), "--shuffle-seed", "3"])
    assert third["shards_written"] == third["shards"]


def test_parquet_format_has_the_hugging_face_image_layout(spark, chain, tmp_path):
    """The layout `datasets` documents for an Image column: struct<bytes: binary, path: string>, and
    the features in the schema metadata under b"huggingface"."""
    en = chain["en"]
    out = tmp_path / "pq"
    stats = run_export(spark, chain["cfg"], ["--dataset", str(chain["dataset"]), "--subset", en,
                                             "--output", str(out), "--format", "parquet"])
    files = sorted(out.glob("[0-9]*.parquet"))
    assert len(files) == stats["shards"] and not list(out.glob("*.tar"))
    rows = subset_table(chain["dataset"] / en)
    stored = stored_images(rows)
    recorded = stored_hashes(chain)
    by_key = {r["key"]: r for r in rows}
    seen = []
    for f in files:
        table = pq.read_table(f)
        assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert features["image"] == {"_type": "Image"}
        for r in table.to_pylist():
            assert r["image"]["bytes"] == stored[r["key"]]
            assert hashlib.sha256(r["image"]["bytes"]).hexdigest() == recorded[r["key"]]["stored_sha256"]
            assert r["image"]["path"] == f"{r['key']}.jpg"
            assert {c: r[c] for c in layout.LAION_COLUMNS} == {c: by_key[r["key"]][c]
                                                                        for c in layout.LAION_COLUMNS}
            seen.append(r["key"])
    assert sorted(seen) == sorted(by_key)
    assert json.loads((out / "sizes.json").read_text()) == {f.name: pq.read_metadata(f).num_rows for f in files}


HF_CHECK = r"""
import hashlib, json, sys
from datasets import Image, load_dataset
kind, pattern = sys.argv[1], sys.argv[2]
if kind == "parquet":
    ds = load_dataset("parquet", data_files={"train": pattern}, split="train")
    decoded = ds[0]["image"]
    ok = type(ds.features["image"]).__name__ == "Image"
    raw = ds.cast_column("image", Image(decode=False))
    out = [(r["key"], hashlib.sha256(r["image"]["bytes"]).hexdigest(), r["TEXT"]) for r in raw]
else:
    ds = load_dataset("webdataset", data_files={"train": pattern}, split="train")
    decoded = ds[0]["jpg"]
    ok = type(ds.features["jpg"]).__name__ == "Image"
    raw = ds.cast_column("jpg", Image(decode=False))
    out = [(r["__key__"], hashlib.sha256(r["jpg"]["bytes"]).hexdigest(), r["txt"]) for r in raw]
print(json.dumps({"image_feature": ok, "decoded_size": list(decoded.size), "rows": out}))
"""


def _hf_python() -> list[str] | None:
    """`datasets` here, or a separate interpreter that has it (CLIPCRAWL_HF_PYTHON): every release of
    `datasets` pins fsspec below this venv's 2026.9.0 (or needs pyarrow >= 22), so it cannot join it."""
    try:
        import datasets  # noqa: F401
        return [sys.executable]
    except ImportError:
        hf = os.environ.get("CLIPCRAWL_HF_PYTHON")
        return [hf] if hf else None


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_hugging_face_datasets_reads_the_export(spark, chain, tmp_path, fmt):
    python = _hf_python()
    if python is None:
        pytest.skip("Hugging Face `datasets` is not installable in this venv (fsspec/pyarrow pins); "
                    "set CLIPCRAWL_HF_PYTHON to an interpreter that has it")
    en = chain["en"]
    out = tmp_path / fmt
    run_export(spark, chain["cfg"], ["--dataset", str(chain["dataset"]), "--subset", en, "--output", str(out),
                                     "--format", fmt])
    pattern = str(out / ("*.tar" if fmt == "webdataset" else "*.parquet"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([*python, "-c", HF_CHECK, fmt, pattern], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = subset_table(chain["dataset"] / en)
    stored = stored_images(rows)
    want = sorted((r["key"], hashlib.sha256(stored[r["key"]]).hexdigest(), r["TEXT"]) for r in rows)
    assert got["image_feature"] and min(got["decoded_size"]) > 0
    assert sorted(tuple(r) for r in got["rows"]) == want


def _source_tar(samples: list[tuple[str, bytes, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, image, text in samples:
            for ext, data in (("jpg", image), ("txt", text.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _rows_for(members: list[dict], tar_path: str, texts: dict[str, str]) -> list[dict]:
    return [{**m, "tar_path": tar_path, "position": i, "TEXT": texts[m["key"]], "SAMPLE_ID": i, "hash": i,
             "URL": f"http://127.0.0.1/{m['key']}.jpg", "HEIGHT": 8, "WIDTH": 8, "similarity": 0.5,
             "LANGUAGE": "en", "punsafe": None, "pwatermark": None} for i, m in enumerate(members)]


def test_index_of_a_truncated_or_missing_source_tar(tmp_path):
    samples = [(f"0000000{i}", bytes([i]) * 3000, f"caption {i}") for i in range(4)]
    data = _source_tar(samples)
    (tmp_path / "00000.tar").write_bytes(data)
    members, error = locate.index_tar(str(tmp_path / "00000.tar"))
    assert error is None and [m["key"] for m in members] == [s[0] for s in samples]
    for m, (_, image, _) in zip(members, samples):
        assert data[m["offset"]:m["offset"] + m["size"]] == image
    (tmp_path / "00001.tar").write_bytes(data[:members[2]["offset"] + 100])   # cut inside the third image
    members, error = locate.index_tar(str(tmp_path / "00001.tar"))
    assert [m["key"] for m in members] == [s[0] for s in samples[:2]] and "truncated" in error
    assert locate.index_tar(str(tmp_path / "00009.tar")) == ([], f"source shard not found: {tmp_path / '00009.tar'}")


def test_plain_index_agrees_with_the_member_by_member_reader_or_defers_to_it(tmp_path):
    """The all-headers-at-once reader gives what the exact reader gives on a plain tar (names of
    exactly 100 bytes and non-ASCII included), and nothing (the exact reader then runs and says
    what is wrong) on a bad checksum, a cut header, a directory member or a prefixed name."""
    import mmap

    def both(data: bytes):
        path = tmp_path / "t.tar"
        path.write_bytes(data)
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            plain = locate._index_plain(mm, len(data))
            exact = locate._index_headers(lambda pos: mm[pos:pos + layout.BLOCK], len(data))
        return plain, exact, locate.index_tar(str(path))

    samples = [("0" * 91 + "0001", b"a" * 700, "x"), ("é2", b"b" * 1024, "y"), ("0003", b"", "")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
        for key, image, text in samples:   # the first one's .json name is 100 bytes long
            for ext, member in (("jpg", image), ("txt", text.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    data = buf.getvalue()
    plain, exact, (members, error) = both(data)
    assert plain == exact[0] and exact[1] is None and error is None
    assert [(m["key"], data[m["offset"]:m["offset"] + m["size"]]) for m in members] == [(k, i) for k, i, _ in samples]
    bad = bytearray(data)
    bad[512 + 1024 + 3] ^= 1   # a byte of the second member's (the caption's) header
    bad_header = bytes(bad[:len(data)])
    for case, error in ((bad_header, "bad header checksum"), (data[:512 + 1024 + 100], "truncated tar")):
        plain, exact, (members, got) = both(case)
        assert plain is None and error in exact[1] and error in got and [m["key"] for m in members] == [samples[0][0]]
    end = len(data.rstrip(b"\0"))
    plain, exact, _ = both(data[:end + (-end % layout.BLOCK)])   # no end blocks: both read every member
    assert plain == exact[0] and len(plain) == 9 and exact[1] is None
    for kind, name in ((tarfile.DIRTYPE, "folder"), (tarfile.REGTYPE, "d" * 90 + "/" + "k" * 60 + ".jpg")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for info in (tarfile.TarInfo(name), tarfile.TarInfo("0005.jpg")):
                info.type = kind if info.name == name else tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(b""))
        plain, exact, (members, error) = both(buf.getvalue())
        assert plain is None and error is None
        assert [m["key"] for m in members] == ([] if kind == tarfile.DIRTYPE else ["d" * 90 + "/" + "k" * 60]) + ["0005"]


def test_key_json_written_in_the_jvm_is_the_row(spark):
    """columns.export_json: keys sorted, nulls kept, NaN and infinities as null, text as is."""
    from spark_jobs import columns

    rows = [(1, "a \"quoted\"\n\tcaption, é 漢字 \u0001", float("nan"), None, 0.30000000000000004, 2 ** 62),
            (2, None, float("inf"), 1e-05, -0.0, -1)]
    df = spark.createDataFrame(rows, "SAMPLE_ID long, TEXT string, punsafe double, pwatermark double, "
                                     "similarity double, hash long")
    names = ["similarity", "TEXT", "SAMPLE_ID", "punsafe", "pwatermark", "hash"]
    got = [r[0] for r in df.select(columns.export_json(df, names)).orderBy(df.SAMPLE_ID).collect()]
    assert [list(json.loads(g)) for g in got] == [sorted(names)] * 2 and "é 漢字" in got[0]
    assert json.loads(got[0]) == {"SAMPLE_ID": 1, "TEXT": rows[0][1], "punsafe": None, "pwatermark": None,
                                  "similarity": 0.30000000000000004, "hash": 2 ** 62}
    assert json.loads(got[1]) == {"SAMPLE_ID": 2, "TEXT": None, "punsafe": None, "pwatermark": 1e-05,
                                  "similarity": -0.0, "hash": -1}


def _interleaved_tars(tmp_path, tars: int = 7, per_tar: int = 4):
    """Source tars written by tarfile and a shard's rows drawing from all of them interleaved (as in a
    shuffled shard), with download's recorded offsets and ext unknown; returns (rows, key -> image)."""
    rows, images = [], {}
    for t in range(tars):
        path = tmp_path / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_tar):
                key, image = f"{t:05d}{i:04d}", os.urandom(700 + 97 * i + t)
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(image)
                tar.addfile(info, io.BytesIO(image))
                images[key] = image
        with tarfile.open(path) as tar:
            rows += [{"key": m.name[:-4], "tar_path": str(path), "offset": m.offset_data, "size": m.size}
                     for m in tar.getmembers()]
    rows.sort(key=lambda r: r["key"][::-1])
    table = pa.Table.from_pylist([{**r, "ext": None, "error_message": None, "position": n, "TEXT": f"t{n}",
                                   **{c: None for c in layout.LAION_COLUMNS if c not in ("key",)}}
                                  for n, r in enumerate(rows)])
    return table, images


def test_a_shard_from_more_source_tars_than_open_handles(tmp_path, monkeypatch):
    """A shard drawing from more source tars than RangeReader keeps open (MAX_OPEN, lowered to 3):
    the recorded offsets are checked and every image is copied, with at most 3 handles open."""
    monkeypatch.setattr(shards.RangeReader, "MAX_OPEN", 3)
    table, images = _interleaved_tars(tmp_path)
    reader, cache = shards.RangeReader(None), {}
    checked = locate.check_recorded(table, reader, cache)
    assert checked.column("ext").to_pylist() == ["jpg"] * len(table) and cache == {}
    assert len(reader._fds) <= 3
    reader.close()
    shards.write_shard(str(tmp_path / "out"), 0, checked, {"format": "webdataset", "plan": "p"})
    got = {s["key"]: s["jpg"] for s in read_export(tmp_path / "out")}
    assert got == images


def test_a_filesystem_without_copy_file_range_gets_the_same_shard(tmp_path, monkeypatch):
    """Where the kernel or filesystem refuses copy_file_range (EXDEV across filesystems, ENOSYS),
    the images are copied through user space: byte-identical shard, every image as tarfile reads it."""
    table, images = _interleaved_tars(tmp_path, tars=3, per_tar=5)
    checked = locate.check_recorded(table, shards.RangeReader(None), {})
    shards.write_shard(str(tmp_path / "kernel"), 0, checked, {"format": "webdataset", "plan": "p"})
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(shards.os, "copy_file_range", refuse)
    shards.write_shard(str(tmp_path / "user"), 0, checked, {"format": "webdataset", "plan": "p"})
    assert len(calls) == 1   # refused once, then user space for the rest of the shard
    assert (tmp_path / "user" / "00000.tar").read_bytes() == (tmp_path / "kernel" / "00000.tar").read_bytes()
    assert {s["key"]: s["jpg"] for s in read_export(tmp_path / "user")} == images


def test_binary_values_are_the_columns_bytes():
    """layout.binary_values (slices of the data buffer) against to_pylist, encoded: nulls, non-ASCII,
    a sliced array, several chunks, binary, large types and numbers (cast to their text)."""
    texts = ["a", None, "", "caf\u00e9 \u732b", "x" * 300, None, "z"]
    want = [(t or "").encode("utf-8") for t in texts]
    string = pa.array(texts, pa.string())
    cases = [string, string.cast(pa.binary()), string.cast(pa.large_string()), string.cast(pa.large_binary()),
             pa.chunked_array([string.slice(0, 3), string.slice(3)])]
    for column in cases:
        assert layout.binary_values(column) == want, column.type
    assert layout.binary_values(string.slice(2, 3)) == want[2:5]
    assert layout.binary_values(pa.chunked_array([], pa.string())) == []
    assert layout.binary_values(pa.array([7, None, -1], pa.int64())) == [b"7", b"", b"-1"]


def test_a_sorted_partition_splits_into_one_table_per_shard():
    """write_partition's grouping: shards that span batches, batches that hold several shards."""
    shard = [0, 0, 0, 2, 2, 5, 5, 5, 5, 9]
    table = pa.table({"shard": pa.array(shard, pa.int32()), "i": list(range(len(shard)))})
    for size in (1, 3, 4, 100):
        got = list(shards._shard_tables(table.to_batches(max_chunksize=size)))
        assert [t.column("shard").to_pylist() for t in got] == [[0] * 3, [2] * 2, [5] * 4, [9]]
        assert [i for t in got for i in t.column("i").to_pylist()] == list(range(len(shard)))
    assert list(shards._shard_tables(iter([]))) == []


def test_shard_written_to_and_read_from_s3(moto_s3):
    """Source tar and export on s3:// (moto on loopback) through fsspec: range reads, shard, marker."""
    from udfs.download.shard_writer import iter_samples

    moto_s3.bucket("laion")
    so = moto_s3.options
    samples = [(f"0000000{i}", os.urandom(2000 + i), f"caption {i}") for i in range(5)]
    moto_s3.client.put_object(Bucket="laion", Key="images/00000.tar", Body=_source_tar(samples))
    members, error = locate.index_tar("s3://laion/images/00000.tar", so)
    assert error is None and len(members) == 5
    rows = _rows_for(members[::-1], "s3://laion/images/00000.tar", {k: t for k, _, t in samples})
    settings = {"format": "webdataset", "plan": "p1", "read_chunk": 2, "storage_options": so}
    res = shards.write_shard("s3://laion/export", 3, rows, settings)
    assert res["status"] == "written" and res["samples"] == 5
    got = list(iter_samples("s3://laion/export/00003.tar", so))
    assert [g["__key__"] for g in got] == [s[0] for s in samples[::-1]]
    assert [g["jpg"] for g in got] == [s[1] for s in samples[::-1]]
    assert [g["txt"].decode() for g in got] == [s[2] for s in samples[::-1]]
    assert shards.write_shard("s3://laion/export", 3, rows, settings)["status"] == "skipped"
    assert shards.write_shard("s3://laion/export", 3, rows, {**settings, "plan": "p2"})["status"] == "written"


def test_tar_headers_are_tarfiles_own_and_the_fast_index_agrees_with_tarfile(tmp_path):
    """Our header builder writes byte for byte what tarfile writes for the same member, and the
    header-only index finds the members tarfile finds (pax headers fall back to tarfile)."""
    for name, size in [("000010003.jpg", 12345), ("a.txt", 0), ("x" * 100, 7), ("é.json", 5), ("k" * 120, 3)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, layout.TAR_MTIME, 0o644
        if len(name.encode()) <= 100:
            assert shards.ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8",
                                                                         "surrogateescape")
    # many at once (numpy) writes the same bytes, and defers to tarfile for names over 100 bytes
    for names in (["000010003.jpg", "a.txt", "x" * 100, "é.json", "0.json"], ["d" * 60 + "/" + "k" * 60, "a.jpg"]):
        sizes = [12345, 0, 7, 5, 8 ** 11 - 1][:len(names)]
        want = b"".join(shards.ustar_header(n, z) for n, z in zip(names, sizes))
        assert shards.ustar_headers([n.encode() for n in names], sizes) == want and len(want) == 512 * len(names)
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        names = ["00000001.jpg", "00000001.txt", "00000002.png", ("p" * 120 if fmt == tarfile.PAX_FORMAT else "q")
                 + ".jpg"]
        with tarfile.open(path, "w", format=fmt) as tar:
            for i, n in enumerate(names):
                info = tarfile.TarInfo(n)
                info.size = 700 + i
                tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        members, error = locate.index_tar(str(path))
        with tarfile.open(path) as tar:
            want = [(m.name.partition(".")[0], m.name.partition(".")[2], m.offset_data, m.size)
                    for m in tar.getmembers() if not m.name.endswith(".txt")]
        assert error is None
        assert [(m["key"], m["ext"], m["offset"], m["size"]) for m in members] == want


@pytest.mark.parametrize("bucket_shift,shard_size", [(58, 50), (54, 7), (63, 1000)])
def test_buckets_give_the_global_order_and_exact_shard_sizes(bucket_shift, shard_size):
    """place + shard_rows (the export's plan, without Spark) against one plain sort of all selected
    rows: each row lands once, at its rank in (_h, _file, _row), shards full but the last, whether
    its image was found or not (the counts are taken before the tars are read). Buckets smaller
    than a shard, larger than one (a bucket spanning several shards), and a single bucket."""
    import random

    rng = random.Random(bucket_shift)
    n = 600
    h = [rng.getrandbits(63) for _ in range(n)]
    h[5] = h[6]   # a tie on the hash: the file and row decide
    table = pa.table({
        "key": [f"k{i:04d}" for i in range(n)], "tar_path": [f"/src/{i % 3}.tar" for i in range(n)],
        "_h": pa.array(h, pa.int64()), "_file": [f"part-{i % 2}" for i in range(n)], "_row": list(range(n)),
        "offset": pa.array([None if i % 50 == 7 else 512 * i for i in range(n)], pa.int64())})
    table = table.append_column("_bucket", pa.array([x >> bucket_shift for x in h], pa.int64()))
    groups = [table.filter(pa.array([t == tar for t in table.column("tar_path").to_pylist()]))
              for tar in sorted(set(table.column("tar_path").to_pylist()))]
    counts = Counter((x >> bucket_shift,) for x in h)   # what job 1 counts in the JVM
    buckets = order.bucket_offsets(list(counts.items()))
    placed = pa.concat_tables(order.place(g, ["_bucket"], buckets, shard_size) for g in groups)
    assert placed.column("shard").null_count == 0
    got = []
    for shard in sorted(set(placed.column("shard").to_pylist())):
        rows = order.shard_rows(placed.filter(pc.equal(placed.column("shard"), shard)), shard, shard_size,
                                ["_h", "_file", "_row"])
        got.append(rows.column("key").to_pylist())
        assert rows.column("position").to_pylist() == list(range(shard * shard_size, shard * shard_size + len(rows)))
    want = [r["key"] for r in sorted(table.to_pylist(), key=lambda r: (r["_h"], r["_file"], r["_row"]))]
    assert [k for keys in got for k in keys] == want
    assert [len(keys) for keys in got] == [shard_size] * (n // shard_size) + ([n % shard_size] if n % shard_size else [])
    with pytest.raises(ValueError, match="not in the export plan"):
        order.place(groups[0], ["_bucket"], dict(list(buckets.items())[1:]), shard_size)
