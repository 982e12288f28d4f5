"""Download shards written to S3 through s3fs, against a moto server on 127.0.0.1 (no AWS)."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from tests.gen.image_server import ImageServer, jpeg_bytes
from udfs import fsio
from udfs.download.download_worker import download_shard, make_key
from udfs.download.shard_writer import ShardWriteError, TarShardWriter, iter_samples, verify_size


@pytest.fixture(scope="module")
def s3(moto_s3):
    moto_s3.bucket("shards")
    return moto_s3.options

def test_shards_on_s3(s3, cfg):
    section = cfg.section("download")
    section.update(allowed_cidrs="127.0.0.0/8", thread_count=4, retries=0)
    out = "s3://shards/images"
    with ImageServer() as srv:
        for i in range(5):
            srv.add(f"/{i}.jpg", jpeg_bytes(seed=i))
        rows = [{"key": make_key(2, i, 4), "url": srv.url(f"/{i}.jpg"), "text": f"t{i}", "uid": f"{i:016x}"}
                for i in range(6)]   # /5.jpg is a 404
        stats = download_shard(2, rows, section, out, storage_options=s3)
    assert stats["successes"] == 5 and stats["status_dict"]["failed_to_download"] == 1
    samples = list(iter_samples(out + "/00002.tar", s3))
    assert sorted(s["__key__"] for s in samples) == [make_key(2, i, 4) for i in range(5)]
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)
    with fsio.open_uri(out + "/00002.parquet", "rb", s3) as fh:
        meta = pq.read_table(io.BytesIO(fh.read())).to_pylist()
    assert len(meta) == 6
    assert fsio.exists(out + "/00002_complete.json", s3) and fsio.exists(out + "/00002_stats.json", s3)
    assert sorted(fsio.expand([out + "/*_complete.json"], s3)) == ["s3://shards/images/00002_complete.json"]


def test_s3_write_failures_raise(s3):
    # a missing bucket: the upload fails on close, and the error reaches the caller
    with pytest.raises(Exception) as err:
        with TarShardWriter("s3://no-such-bucket/x/00000.tar", s3) as w:
            w.write("000000000", {"txt": b"x" * 100})
    assert not isinstance(err.value, AssertionError)
    # a size that does not match what we wrote is an error, never a silent success
    fsio.write_bytes_atomic("s3://shards/check.bin", b"12345", s3)
    verify_size("s3://shards/check.bin", 5, s3)
    with pytest.raises(ShardWriteError):
        verify_size("s3://shards/check.bin", 6, s3)
    with pytest.raises(ShardWriteError):
        verify_size("s3://shards/missing.bin", 1, s3)
