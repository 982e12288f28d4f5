"""The clip-score stage on local Spark: output contract (schemas.SCORED partitioned by status,
pass-through statuses, clip-retrieval layout row-aligned with the parquet), stats, errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from spark_jobs import clip_score, datasets
from spark_jobs.config import ConfigError
from spark_jobs.schemas import SCORED
from tests.gen.image_shards import Row, mixed_rows, write_images_folder
from udfs.clip import embeddings

TINY = ["clip.model=local-dir:tests/fixtures/tiny_clip", "clip.pretrained=null", "clip.batch_size=4"]


def _run(spark, cfg, images, output, extra=()):
    args = argparse.Namespace(input=str(images), output=str(output))
    return clip_score.run(spark, cfg.with_overrides([*TINY, *extra]), args)


@pytest.mark.slow
def test_stage_contract(spark, cfg, tmp_path):
    rows0 = mixed_rows(10, seed=1, mismatch_every=2)
    rows0 += [Row(status="failed_to_download"), Row("blue", "star", corrupt=True),
              Row("green", "circle", omit_from_tar=True)]
    rows1 = [Row("yellow", "star", lang="fr"), Row(status="too_small")]
    rows2 = [Row(status="opted_out")]   # a shard without any success row: no model load, no npy part
    meta = write_images_folder(tmp_path / "images", [rows0, rows1, rows2])
    out = tmp_path / "scored"
    stats = _run(spark, cfg, tmp_path / "images", out, ["clip.shards_per_embedding_file=1"])

    assert datasets.read_stats(str(out))["stage"] == "clip-score"
    assert stats["rows"] == len(meta) == 16
    assert stats["status_counts"] == {"success": 11, "failed_to_download": 1, "failed_to_decode": 1,
                                      "missing_from_shard": 1, "too_small": 1, "opted_out": 1}
    assert stats["scored"] == stats["output_rows"] == 11 and stats["input_rows"] == 16
    assert stats["retrieval_layout"] == {"parts": 2, "rows": 11}
    assert stats["tasks"]["images_scored"] == 11
    for phase in ("read", "preprocess", "inference", "write"):
        assert phase in stats["tasks"]["task_seconds"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("status=")) == [
        f"status={s}" for s in sorted(stats["status_counts"])]

    df = datasets.read_dataset(spark, str(out), SCORED)    # the filter reads it this way
    assert [f.name for f in df.schema.fields if f.name != "status"] == [
        f.name for f in SCORED.schema.fields if f.name != "status"]
    got = {r["key"]: r for r in df.collect()}
    assert set(got) == {m["key"] for m in meta}
    for m in meta:
        r = got[m["key"]]
        assert r["uid"] == m["uid"] and r["url"] == m["url"] and r["text"] == m["text"]
        if r["status"] == "success":
            assert r["similarity"] is not None and len(r["image_embedding"]) == 64 * 2
            assert r["tar_path"].endswith(f"{m['shard']:05d}.tar")
        else:
            assert r["similarity"] is None and r["image_embedding"] is None and r["text_embedding"] is None
    assert got["000000010"]["status"] == "failed_to_download"
    assert got["000000010"]["error_message"] == "failed_to_download (generated)"
    assert "cannot identify image" in got["000000011"]["error_message"]

    # matching captions clearly above mismatching ones
    sims = {i: got[f"00000{i:04d}"]["similarity"] for i in range(10)}
    match = [sims[i] for i, r in enumerate(rows0[:10]) if r.matching]
    mismatch = [sims[i] for i, r in enumerate(rows0[:10]) if not r.matching]
    assert min(match) > max(mismatch)

    # clip-retrieval layout: one part per shard with success rows, row-aligned with the parquet
    assert embeddings.list_retrieval_parts(str(out)) == [0, 1]
    img, txt, md = embeddings.read_retrieval(str(out))
    assert img.dtype == np.float16 and img.shape == (11, 64) and txt.shape == (11, 64)
    assert {"url", "text", "key", "similarity", "uid"} <= set(md.columns)
    for i, key in enumerate(md["key"]):
        r = got[key]
        assert r["status"] == "success" and md.loc[i, "url"] == r["url"]
        np.testing.assert_array_equal(img[i], np.frombuffer(r["image_embedding"], "<f2"))
        np.testing.assert_array_equal(txt[i], np.frombuffer(r["text_embedding"], "<f2"))
        sim = float(img[i].astype(np.float32) @ txt[i].astype(np.float32))
        assert sim == pytest.approx(r["similarity"], abs=5e-3)


@pytest.mark.slow
def test_stage_with_no_success_rows_and_errors(spark, cfg, tmp_path):
    write_images_folder(tmp_path / "images", [[Row(status="failed_to_download"), Row(status="opted_out")]])
    stats = _run(spark, cfg, tmp_path / "images", tmp_path / "scored")
    assert stats["status_counts"] == {"failed_to_download": 1, "opted_out": 1}
    assert stats["scored"] == 0 and stats["retrieval_layout"]["rows"] == 0

    with pytest.raises(datasets.InputError, match="not found"):
        _run(spark, cfg, tmp_path / "nowhere", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.InputError, match="no shard metadata"):
        _run(spark, cfg, tmp_path / "empty", tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown open_clip model name"):
        _run(spark, cfg, tmp_path / "images", tmp_path / "x", ["clip.model=ViT-B-99"])
    with pytest.raises(ConfigError, match="checkpoint not found"):
        _run(spark, cfg, tmp_path / "images", tmp_path / "x",
             ["clip.model=ViT-B-32", f"clip.pretrained={tmp_path / 'missing.pt'}"])


@pytest.mark.slow
def test_corrupt_checkpoint_found_in_the_worker_is_a_config_error(spark, cfg, tmp_path):
    """The driver only checks that the files exist; the worker that loads a corrupt checkpoint
    fails the job, and the stage reports it as one clear configuration error."""
    import shutil

    from tests.test_clip_model import TINY

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(TINY / "open_clip_config.json", folder)
    (folder / "open_clip_model.safetensors").write_bytes(b"\x00" * 100)
    write_images_folder(tmp_path / "images", [[Row("red", "circle")]])
    with pytest.raises(ConfigError, match="corrupt checkpoint"):
        _run(spark, cfg, tmp_path / "images", tmp_path / "scored", [f"clip.model=local-dir:{folder}"])
    assert not datasets.is_complete(str(tmp_path / "scored"))


def test_embedding_parts_are_counted_from_shard_file_names():
    files = [f"s3://b/images/{i:05d}.parquet" for i in (0, 1, 2, 5)]
    assert clip_score._count_parts(files, 1) == 4
    assert clip_score._count_parts(files, 2) == 3          # parts 0, 1, 2
    assert clip_score._count_parts(["/x/part-0001.parquet"], 1) is None   # not a shard name: Spark counts
