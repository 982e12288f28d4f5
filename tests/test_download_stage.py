"""The `download` stage on Spark against the loopback image server: shards, metadata of every row,
stats, default-deny, resume and --retry-failed."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from spark_jobs import datasets, download
from tests.gen.image_server import ImageServer, Response, jpeg_bytes
from udfs.download.shard_writer import iter_samples
from udfs.ids import pair_uid

pytestmark = pytest.mark.slow

FAST = ["download.allowed_cidrs=127.0.0.0/8", "download.read_timeout=0.5", "download.retries=1",
        "download.backoff_base=0.01", "download.thread_count=8", "download.shard_size=8"]


def _args(inp, out, retry=None):
    return argparse.Namespace(input=inp, output=str(out), retry_failed=retry)


def _input(tmp_path: Path, urls: list[str], name="pairs", with_uid=False) -> str:
    path = tmp_path / name
    path.mkdir()
    frame = pd.DataFrame({"url": urls, "text": [f"caption of {u.rsplit('/', 1)[-1]}" for u in urls]})
    if with_uid:   # as in the dedup output
        frame["uid"] = [pair_uid(u, t) for u, t in zip(frame.url, frame.text)]
        frame["page_url"] = "http://example.invalid/page"
    frame.to_parquet(path / "part-0.parquet")
    return str(path)


def _metadata(spark, out) -> pd.DataFrame:
    return spark.read.parquet(str(Path(out) / "*.parquet")).toPandas()


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        srv.routes = srv.add_test_routes(slow_seconds=1.0)
        yield srv


def test_stage_writes_every_row_and_resumes(spark, cfg, server, tmp_path):
    conf = cfg.with_overrides(FAST)
    urls = [server.url(p) for p in server.routes]
    inp = _input(tmp_path, urls)
    out = tmp_path / "images"
    stats = download.run(spark, conf, _args(inp, out))

    meta = _metadata(spark, out)
    assert len(meta) == len(urls) == stats["input_rows"] == stats["metadata_rows"]
    datasets.check_schema(spark.read.parquet(str(out / "*.parquet")), download.IMAGES_METADATA)
    got = dict(zip(meta.url.str.split(str(server.port)).str[1], meta.status))
    assert got == server.routes
    assert stats["status_counts"] == meta.status.value_counts().to_dict()
    assert stats["output_rows"] == (meta.status == "success").sum()
    assert stats["success_rate"] == pytest.approx(stats["output_rows"] / len(urls), abs=1e-4)
    assert datasets.read_stats(str(out))["shards"] == 3 == stats["shards_written"]
    # keys: 5-digit shard + 4-digit index; uids computed for an input without them
    assert meta.key.str.len().eq(9).all() and meta.key.is_unique
    assert (meta.key.str[:5].astype(int) == meta.shard).all()
    assert list(meta.uid) == [pair_uid(u, t) for u, t in zip(meta.url, meta.text)]
    for shard, grp in meta.groupby("shard"):
        names = {p.name for p in out.glob(f"{shard:05d}*")}
        assert names == {f"{shard:05d}.tar", f"{shard:05d}.parquet", f"{shard:05d}_stats.json",
                         f"{shard:05d}_complete.json"}
        keys = {s["__key__"] for s in iter_samples(str(out / f"{shard:05d}.tar"))}
        assert keys == set(grp[grp.status == "success"].key)

    # rerun: every shard is complete, the server sees no request
    before = server.request_count()
    again = download.run(spark, conf, _args(inp, out))
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0
    assert server.request_count() == before and again["status_counts"] == stats["status_counts"]

    # a shard without its marker (killed mid-write) is redone, alone, with the same keys
    (out / "00001_complete.json").unlink()
    third = download.run(spark, conf, _args(inp, out))
    assert third["shards_written"] == 1 and third["shards_skipped"] == 2
    redone = _metadata(spark, out)
    assert sorted(redone.key) == sorted(meta.key)
    requested = server.request_count() - before
    assert 8 <= requested <= 8 * 3   # shard 1's rows only (retries and redirect hops included)

    # the same output with another input is refused
    other = _input(tmp_path, urls[:5], name="other")
    with pytest.raises(datasets.InputError, match="different input"):
        download.run(spark, conf, _args(other, out))


def test_default_deny_sends_nothing(spark, cfg, server, tmp_path):
    conf = cfg.with_overrides([o for o in FAST if not o.startswith("download.allowed_cidrs")])
    inp = _input(tmp_path, [server.url("/ok.jpg"), server.url("/redirect/3"), server.url("/ok.png", "localhost")])
    before = server.request_count()
    stats = download.run(spark, conf, _args(inp, tmp_path / "images"))
    assert stats["status_counts"] == {"blocked_address": 3}
    assert server.request_count() == before


def test_retry_failed_reattempts_only_retryable_rows(spark, cfg, tmp_path):
    with ImageServer() as srv:
        for i in range(6):
            srv.add(f"/good{i}.jpg", jpeg_bytes(seed=i))
        for i in range(3):   # fail twice, then recover: the first run (1 retry) gives up on them
            srv.add_sequence(f"/later{i}.jpg", [Response(503, b"busy", "text/plain"),
                                                Response(503, b"busy", "text/plain"),
                                                Response(200, jpeg_bytes(seed=10 + i))])
        srv.add("/gone.jpg", b"nope", "text/plain", status=404)
        urls = [srv.url(f"/good{i}.jpg") for i in range(6)] + [srv.url(f"/later{i}.jpg") for i in range(3)] \
            + [srv.url("/gone.jpg")]
        conf = cfg.with_overrides(FAST)
        first_out = tmp_path / "first"
        first = download.run(spark, conf, _args(_input(tmp_path, urls, with_uid=True), first_out))
        assert first["status_counts"] == {"success": 6, "failed_to_download": 4}
        assert first["retryable_failures"] == 3
        before = {p: srv.request_count(p) for p in ["/gone.jpg"] + [f"/good{i}.jpg" for i in range(6)]}

        second_out = tmp_path / "second"
        second = download.run(spark, conf, _args(None, second_out, retry=str(first_out)))
        assert second["status_counts"] == {"success": 9, "failed_to_download": 1}
        assert second["retryable_failures"] == 0 and second["mode"] == "retry"
        # only the retryable rows were requested again
        assert all(srv.request_count(p) == n for p, n in before.items())
        old, new = _metadata(spark, first_out), _metadata(spark, second_out)
        assert sorted(old.key) == sorted(new.key)
        assert list(old.sort_values("key").uid) == sorted(old.uid)   # ranked by uid
        assert set(old.page_url) == {"http://example.invalid/page"}
        merged = new.set_index("key")
        for row in old.itertuples():
            if row.status == "success":   # carried over unchanged, image copied from the old tar
                assert merged.loc[row.key, "sha256"] == row.sha256
        tar_keys = set()
        for tar in sorted(second_out.glob("*.tar")):
            tar_keys |= {s["__key__"] for s in iter_samples(str(tar))}
        assert tar_keys == set(new[new.status == "success"].key)
        # the recorded image offsets point into the new tars, carried images and fetched ones alike
        members = {}
        for tar in sorted(second_out.glob("*.tar")):
            with tarfile.open(tar) as t:
                members.update({m.name: (m.offset_data, m.size) for m in t.getmembers()})
        for row in new.itertuples():
            if row.status == "success":
                assert (row.image_offset, row.image_size) == members[f"{row.key}.jpg"], row.key
            else:
                assert pd.isna(row.image_offset) and pd.isna(row.image_size)
        with pytest.raises(datasets.InputError, match="new --output"):
            download.run(spark, conf, _args(None, first_out, retry=str(first_out)))
        shard_stats = json.loads((second_out / "00000_stats.json").read_text())
        assert shard_stats["carried"] + shard_stats["fetched"] == shard_stats["count"]


def test_ranks_are_a_global_sort_whatever_the_bucket_prefix(spark):
    """Shard and position of every row are its rank in (uid, url, text, page_url) order, divided by
    the shard size, with the buckets at full length or merged to 1 or 2 characters."""
    import random

    from spark_jobs import columns

    rng = random.Random(7)
    uids = ["".join(rng.choice("0123456789abcdef") for _ in range(16)) for _ in range(300)]
    uids += uids[:40]   # equal uids: the URL breaks the tie
    rows = [(u, f"http://h/{rng.randrange(10**6)}", "t", None, None) for u in uids]
    df = spark.createDataFrame(rows, "uid string, url string, text string, page_url string, page_opt_out string")
    keyed = columns.with_shard_order(df)
    counts = columns.bucket_counts(keyed)
    expected = {(r[0], r[1]): (i // 7, i % 7) for i, r in enumerate(sorted(rows, key=lambda r: (r[0], r[1])))}
    for min_buckets, chars in ((1, 1), (17, 2), (10**9, columns.BUCKET_CHARS)):
        assert columns.coarse_buckets(counts, min_buckets)[0] == chars
        got = columns.ranked_into_shards(keyed, counts, 7, min_buckets).select(
            "row.uid", "row.url", "shard", "row.position").collect()
        assert {(r[0], r[1]): (r[2], r[3]) for r in got} == expected
    assert columns.coarse_buckets([("0a1", 2), ("0a2", 3), ("1ff", 4)], 2) == (1, [("0", 5), ("1", 4)])
    assert sum(n for _, n in columns.coarse_buckets(counts, 17)[1]) == len(rows)
