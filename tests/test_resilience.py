"""Resilience at stage boundaries: a task that dies is retried by Spark without corrupting the
output, and bad data between stages gives a clear error or a counted result, never a silent loss.

The kill-and-rerun proof of the whole pipeline is in test_pipeline_e2e.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from spark_jobs import cli, download
from tests.gen.image_server import ImageServer, jpeg_bytes

pytestmark = pytest.mark.slow

FAST = ["download.allowed_cidrs=127.0.0.0/8", "download.thread_count=4", "download.shard_size=4",
        "download.retries=0"]


def _tar_digest(path: Path) -> dict[str, str]:
    """member name -> sha256, for the image and caption members (the .json holds timings)."""
    out = {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            if not member.name.endswith(".json"):
                out[member.name] = hashlib.sha256(tf.extractfile(member).read()).hexdigest()
    return out


def _shards(folder: Path) -> dict[str, dict[str, str]]:
    return {p.name: _tar_digest(p) for p in sorted(folder.glob("*.tar"))}


def test_a_failed_download_task_is_retried_and_the_output_is_unchanged(spark, cfg, tmp_path):
    assert spark.sparkContext.master.endswith(",2]"), "the shared test session must allow one task retry"
    with ImageServer() as server:
        urls = [server.url(server.add(f"/img/{i}.jpg", jpeg_bytes(200 + i, 150, seed=i))) for i in range(12)]
        inp = tmp_path / "pairs"
        inp.mkdir()
        pd.DataFrame({"url": urls, "text": [f"picture number {i}" for i in range(12)]}).to_parquet(
            inp / "part-0.parquet")
        clean, faulty, log = tmp_path / "clean", tmp_path / "faulty", tmp_path / "faults"
        download.run(spark, cfg.with_overrides(FAST), argparse.Namespace(
            input=str(inp), output=str(clean), retry_failed=None))
        stats = download.run(spark, cfg.with_overrides(
            [*FAST, "testing.inject_failure=download:1", f"testing.fault_log={log}"]),
            argparse.Namespace(input=str(inp), output=str(faulty), retry_failed=None))

    assert [p.name for p in log.iterdir()] == ["download-p1-a0"], "the fault must have fired once"
    assert stats["input_rows"] == 12
    assert _shards(faulty) == _shards(clean) and len(_shards(clean)) == 3
    cols = ["key", "uid", "url", "status", "sha256", "width", "height"]
    meta = {name: pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / name).glob("*.parquet")))[cols]
            .sort_values("key").reset_index(drop=True) for name in ("clean", "faulty")}
    pd.testing.assert_frame_equal(meta["clean"], meta["faulty"])
    assert meta["faulty"].key.is_unique and (meta["faulty"].status == "success").all()


# --- bad data at every stage boundary ----------------------------------------------------------

PARQUET_STAGES = ("dedup", "download", "image-dedup", "clip-score", "filter", "build-index")


def _cli(stage: str, inp: Path, out: Path, capsys) -> tuple[int, str]:
    argv = [stage, "--input", str(inp), "--output", str(out), "--set", "download.allowed_cidrs=127.0.0.0/8"]
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _wrong_schema(folder: Path) -> None:
    folder.mkdir(parents=True)
    pd.DataFrame({"colour": ["red"], "size": [3]}).to_parquet(folder / "part-0.parquet")
    (folder / "00000.parquet").write_bytes((folder / "part-0.parquet").read_bytes())  # download's layout


def _corrupt(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("part-0.parquet", "00000.parquet"):
        (folder / name).write_bytes(b"PAR1" + bytes(range(256)) * 4)


@pytest.mark.parametrize("stage", PARQUET_STAGES)
def test_missing_input_is_a_clear_error(stage, tmp_path, capsys):
    code, err = _cli(stage, tmp_path / "does-not-exist", tmp_path / "out", capsys)
    assert code == cli.EXIT_USER_ERROR
    assert "does-not-exist" in err and "error" in err
    assert not (tmp_path / "out" / "_stats").exists()


@pytest.mark.parametrize("make_input", [_wrong_schema, _corrupt], ids=["schema_mismatch", "corrupt_parquet"])
@pytest.mark.parametrize("stage", PARQUET_STAGES)
def test_unusable_input_is_a_clear_error(stage, make_input, tmp_path, capsys):
    make_input(tmp_path / "in")
    code, err = _cli(stage, tmp_path / "in", tmp_path / "out", capsys)
    assert code == cli.EXIT_USER_ERROR, err
    assert "error" in err
    assert not (tmp_path / "out" / "_stats").exists()


@pytest.mark.parametrize("stage", PARQUET_STAGES)
def test_empty_input_is_counted_or_refused(stage, tmp_path, capsys):
    """An empty folder: either a clear error, or a complete output whose stats say 0 rows."""
    (tmp_path / "in").mkdir()
    code, err = _cli(stage, tmp_path / "in", tmp_path / "out", capsys)
    if code == 0:
        stats = json.loads((tmp_path / "out" / "_stats" / "stats.json").read_text())
        counted = [v for k, v in stats.items() if k in ("input_rows", "rows_in", "output_rows", "vectors")]
        assert counted and all(v == 0 for v in counted), stats
    else:
        assert code == cli.EXIT_USER_ERROR and "error" in err, err
