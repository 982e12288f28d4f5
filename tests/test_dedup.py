"""The dedup stage on a local Spark: exact dedup, the Bloom join across runs, killed runs,
damaged filters and the failed-URL filter. Inputs are small DataFrames of the wat_pairs schema."""

from __future__ import annotations

import argparse
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import columns, datasets, dedup
from spark_jobs.schemas import DEDUP_REJECTED, WAT_PAIRS
from udfs.dedup import bloom, dedup_keys, probe
from udfs.dedup.bloom_store import BloomStore
from udfs.ids import pair_uid

CRAWLS = ("CC-MAIN-2024-10", "CC-MAIN-2024-18")


@pytest.fixture(scope="module")
def dcfg(cfg):
    return cfg.with_overrides(["dedup.shards=2", "dedup.expected_keys=20000",
                               "dedup.failed_shards=2", "dedup.failed_expected_keys=5000"])


def pair(i: int, url: str | None = None, text: str | None = None, date: str = "2024-03-01T00:00:00Z",
         crawl: str = CRAWLS[0]) -> tuple:
    url = url or f"https://img{i % 7}.example.com/p/{i}.jpg"
    text = text or f"caption number {i}"
    return (pair_uid(url, text), url, text, f"https://site.example/{i}", "f.wat.gz", f"<urn:{i}>",
            date, False, None, crawl)   # page_opt_out None


def write_input(spark, path, rows) -> str:
    datasets.write_dataset(spark.createDataFrame(rows, WAT_PAIRS.schema), str(path), WAT_PAIRS)
    return str(path)


def run_dedup(spark, cfg, *argv) -> dict:
    parser = argparse.ArgumentParser()
    dedup.add_arguments(parser)
    return dedup.run(spark, cfg, parser.parse_args([str(a) for a in argv]))


def uids(spark, path) -> set[str]:
    return {r.uid for r in spark.read.parquet(str(path)).select("uid").collect()}


def test_jvm_keys_digests_and_shards_match_python(spark):
    from pyspark.sql import functions as F

    cases = [("http://Example.Com/a.jpg#frag", "  a\u00a0red\t\ncircle "),
             ("HTTPS://user:PW@CDN.example.ORG:8443/Img.PNG?W=1#f", "x\u2028y"),
             (" http://x.COM/Path ", "\u3000lead and trail\u205f"),
             ("//CDN.x/a#b", "t"), ("data:image/png;base64,AAAA#x", "t"), ("nohost", ""),
             (None, None), ("http://h.example/\u00e9\u00c9?Q#\n", "ÜNÏ\x1ccode"),
             ("http://a.b/#", "multi\n\nline\r\ntext"), ("HTTP://", "x"), ("Http://HOST?Q=A#y", "x"),
             ("ftp://U@H.COM:21/A", "x"), ("http://a@b@C.com/D", "x"), ("\u3000https://A.b\u00a0", "x"),
             ("mailto:X@Y.COM", "x"), ("http://[::FFFF]:80/P", "x"), ("h\nttp://X.y/", "x"),
             ("http://x/", "   "), ("http://x/", "a \u2003\u2003 b  c\x0b"), ("http://x/", "")]
    df = spark.createDataFrame(cases, "url string, text string")
    df = (df.withColumn("pk", columns.pair_key_column(F.col("url"), F.col("text")))
            .withColumn("uk", columns.url_key_column(F.col("url"))))
    df = columns.with_key_digest(df, "url", "text", "d", "s", 5)
    df = columns.with_key_digest(df, "url", None, "ud", "us", 3)
    rows = df.collect()
    for (url, text), row in zip(cases, rows):
        assert row.pk == dedup_keys.pair_key(url, text), (url, text)
        assert row.uk == dedup_keys.url_key(url)
        for key, digest, shard, count in ((row.pk, row.d, row.s, 5), (row.uk, row.ud, row.us, 3)):
            words = bloom.digests([key])
            assert bytes(digest) == b"".join(int(w).to_bytes(8, "big") for w in words[0])
            assert shard == int(bloom.shard_of(words, count)[0])


def test_shard_partitioning_puts_exactly_one_shard_in_each_partition(spark):
    from pyspark.sql import functions as F

    df = spark.range(3000).select(F.col("id").cast("string").alias("url"), F.lit("t").alias("text"))
    df = columns.with_key_digest(df, "url", "text", "_digest", "_shard", 7)
    parts = columns.shard_partitioning(spark, df, "_shard", "_part", 7)
    assert parts.rdd.getNumPartitions() == 7
    per_partition = (parts.groupBy(F.spark_partition_id().alias("p"))
                     .agg(F.countDistinct("_shard").alias("n"), F.min("_shard").alias("s")).collect())
    assert sorted((r.p, r.n) for r in per_partition) == [(i, 1) for i in range(7)]
    assert all(r.p == r.s for r in per_partition)


@pytest.mark.slow
def test_exact_dedup_keeps_the_earliest_then_smallest_uid(spark, dcfg, tmp_path):
    rows = [pair(i) for i in range(200)]
    # key A: three spellings of one pair; the one with the earliest date must win
    rows += [pair(1000, "http://dup.example/a.jpg", "same  text", date="2024-03-05"),
             pair(1001, "HTTP://DUP.example/a.jpg#x", "same text", date="2024-03-02", crawl=CRAWLS[1]),
             pair(1002, "http://dup.example/a.jpg", " same\ttext ", date="2024-03-09")]
    # key B: same date, so the smallest uid wins
    rows += [pair(2000, "http://dup.example/b.jpg", "b", date="2024-03-01"),
             pair(2001, "http://DUP.example/b.jpg", "b", date="2024-03-01")]
    rows += [pair(i) for i in range(50)]  # exact copies of 50 earlier rows
    src = write_input(spark, tmp_path / "in", rows)
    out = tmp_path / "out"
    stats = run_dedup(spark, dcfg, "--input", src, "--output", out)

    winner_a = rows[201]
    winner_b = min(rows[203], rows[204], key=lambda r: r[0])
    loser_b = max(rows[203], rows[204], key=lambda r: r[0])
    kept = uids(spark, out)
    assert len(kept) == 202
    assert winner_a[0] in kept and rows[200][0] not in kept and rows[202][0] not in kept
    assert winner_b[0] in kept and loser_b[0] not in kept
    rejected = spark.read.parquet(str(out) + "_rejected")
    assert set(rejected.columns) == set(DEDUP_REJECTED.schema.fieldNames())
    by_uid = {r.uid: r for r in rejected.collect()}
    assert {r.status for r in by_uid.values()} == {"duplicate"}
    assert by_uid[rows[200][0]].error_message == f"duplicate of uid {winner_a[0]}"
    assert by_uid[loser_b[0]].error_message == f"duplicate of uid {winner_b[0]}"
    assert stats["input_rows"] == len(rows) and stats["output_rows"] == 202
    assert stats["exact_duplicates"] == 53 and stats["bloom_drops"] == 0
    assert stats["seen_filter"] is None
    # same schema and partitioning as the input
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("crawl=")) == [f"crawl={c}" for c in CRAWLS]
    datasets.check_schema(spark.read.parquet(str(out)), WAT_PAIRS)
    assert json.loads((out / "_stats" / "stats.json").read_text())["output_rows"] == 202


@pytest.mark.slow
def test_two_runs_in_a_row_then_overlapping_input_keeps_only_new_pairs(spark, dcfg, tmp_path):
    seen = tmp_path / "seen"
    first = [pair(i) for i in range(1500)]
    src1 = write_input(spark, tmp_path / "in1", first + first[:100])
    s1 = run_dedup(spark, dcfg, "--input", src1, "--output", tmp_path / "o1", "--seen", seen)
    assert s1["output_rows"] == 1500 and s1["exact_duplicates"] == 100
    assert s1["seen_filter"]["generation_read"] is None and s1["seen_filter"]["generation_written"] == 1
    assert s1["seen_filter"]["keys"] == 1500

    s2 = run_dedup(spark, dcfg, "--input", src1, "--output", tmp_path / "o2", "--seen", seen)
    assert s2["output_rows"] == 0 and s2["bloom_drops"] == 1500  # no false negative: nothing kept
    assert s2["seen_filter"]["generation_read"] == 1 and s2["seen_filter"]["generation_written"] == 2

    # half old, half new (the new ones in another crawl)
    new = [pair(i, crawl=CRAWLS[1]) for i in range(5000, 5800)]
    src3 = write_input(spark, tmp_path / "in3", first[700:] + new)
    s3 = run_dedup(spark, dcfg, "--input", src3, "--output", tmp_path / "o3", "--seen", seen)
    kept = uids(spark, tmp_path / "o3")
    new_uids = {r[0] for r in new}
    assert not kept - new_uids                          # nothing old comes back
    lost = new_uids - kept                              # new pairs lost only to false positives
    fp_rate = s3["seen_filter"]["configured_false_positive_rate"]
    assert len(lost) <= max(3, 3 * fp_rate * len(new)), len(lost)
    assert s3["bloom_drops"] == 800 + len(lost)
    assert s3["seen_filter"]["keys"] == 1500 + len(kept)
    assert 0 < s3["seen_filter"]["fill_ratio"] < 0.2
    assert s3["seen_filter"]["estimated_false_positive_rate"] < fp_rate


def _copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_run_killed_between_writing_rows_and_publishing_the_filter(spark, dcfg, tmp_path, monkeypatch):
    seen = tmp_path / "seen"
    old = [pair(i) for i in range(400)]
    run_dedup(spark, dcfg, "--input", write_input(spark, tmp_path / "in1", old),
              "--output", tmp_path / "o1", "--seen", seen)
    src2 = write_input(spark, tmp_path / "in2", old[:200] + [pair(i) for i in range(900, 1300)])
    control_seen = _copy_store(seen, tmp_path / "control_seen")

    def killed(*args, **kwargs):
        raise RuntimeError("killed before publish")
    monkeypatch.setattr(BloomStore, "publish", killed)
    with pytest.raises(RuntimeError, match="killed before publish"):
        run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "o2", "--seen", seen)
    monkeypatch.undo()
    # rows were written, the filter was not published: generation 1 is still current and intact
    assert len(uids(spark, tmp_path / "o2")) > 0 and not datasets.is_complete(str(tmp_path / "o2"))
    store = BloomStore(str(seen), "pair")
    assert store.current_generation() == 1
    store.verify(store.manifest(1), full=True)

    rerun = run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "o2", "--seen", seen)
    control = run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "control",
                        "--seen", control_seen)
    assert uids(spark, tmp_path / "o2") == uids(spark, tmp_path / "control")   # same output, no loss
    assert rerun["output_rows"] == control["output_rows"] >= 390
    assert rerun["seen_filter"]["generation_read"] == 1
    assert rerun["seen_filter"]["generation_written"] == 3  # the dead run's folder 2 is not reused
    assert rerun["seen_filter"]["keys"] == control["seen_filter"]["keys"]


@pytest.mark.slow
def test_run_killed_after_publishing_before_its_stats(spark, dcfg, tmp_path, monkeypatch):
    seen = tmp_path / "seen"
    run_dedup(spark, dcfg, "--input", write_input(spark, tmp_path / "in1", [pair(i) for i in range(300)]),
              "--output", tmp_path / "o1", "--seen", seen)
    src2 = write_input(spark, tmp_path / "in2", [pair(i) for i in range(200, 600)])

    real_write_stats = datasets.write_stats

    def killed(output, *args, **kwargs):
        if str(output) == str(tmp_path / "o2"):
            raise RuntimeError("killed before stats")
        return real_write_stats(output, *args, **kwargs)
    monkeypatch.setattr(datasets, "write_stats", killed)
    with pytest.raises(RuntimeError, match="killed before stats"):
        run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "o2", "--seen", seen)
    monkeypatch.undo()
    first_try = uids(spark, tmp_path / "o2")
    assert BloomStore(str(seen), "pair").current_generation() == 2  # published, then died

    # the rerun must not find its own pairs in generation 2 and write an empty output
    rerun = run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "o2", "--seen", seen)
    assert rerun["seen_filter"]["resumed_from_parent"] is True
    assert rerun["seen_filter"]["generation_read"] == 1
    assert uids(spark, tmp_path / "o2") == first_try and len(first_try) >= 295
    # a later, different run reads the newest generation as usual
    again = run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "o3", "--seen", seen)
    assert again["seen_filter"]["generation_read"] == 3 and again["output_rows"] == 0


@pytest.mark.slow
def test_damaged_or_missing_filter_is_a_clear_error_or_a_documented_fresh_start(
        spark, dcfg, tmp_path, capsys):
    seen = tmp_path / "seen"
    rows = [pair(i) for i in range(500)]
    src = write_input(spark, tmp_path / "in", rows)
    run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o1", "--seen", seen)
    store = BloomStore(str(seen), "pair")
    man = store.manifest(1)
    path = seen / next(e for e in man.shards if e)["path"]
    good = path.read_bytes()

    def cli(output, *extra):
        return dedup.main(["--input", src, "--output", str(tmp_path / output), "--seen", str(seen),
                           "--set", "spark.master=local[2]", "--set", "dedup.shards=2", *extra])

    # a flipped bit inside a shard: found by the task that loads it
    path.write_bytes(good[:200] + bytes([good[200] ^ 4]) + good[201:])
    assert cli("o2") == 2
    err = capsys.readouterr().err
    assert "filter shard is damaged" in err and "payload checksum" in err
    assert store.current_generation() == 1
    # a missing shard file: found on the driver before any work
    path.unlink()
    assert cli("o3") == 2
    assert "is missing" in capsys.readouterr().err and not (tmp_path / "o3").exists()

    # fresh start: every pair is kept again (duplicates across runs, never lost rows)
    path.write_bytes(good[:200] + bytes([good[200] ^ 4]) + good[201:])
    assert cli("o4", "--set", "dedup.on_corrupt_filter=fresh_start") == 0
    capsys.readouterr()
    stats = datasets.read_stats(str(tmp_path / "o4"))
    assert stats["output_rows"] == 500
    assert "payload checksum" in stats["seen_filter"]["fresh_start_reason"]
    assert stats["seen_filter"]["generation_read"] is None
    assert stats["seen_filter"]["generation_written"] >= 2
    assert (seen / "gen-000001" / "manifest.json").exists()  # the damaged generation is left for inspection


@pytest.mark.slow
def test_failed_url_filter_fed_from_download_metadata(spark, dcfg, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    meta = [("http://bad.example/gone.jpg", "failed_to_download", False),
            ("http://bad.example/huge.jpg", "too_large", False),
            ("http://flaky.example/503.jpg", "failed_to_download", True),   # retryable: not added
            ("http://ok.example/fine.jpg", "success", False),
            ("http://bad.example/nul.jpg", "failed_to_download", None)]
    pq.write_table(pa.table({"url": [m[0] for m in meta], "status": [m[1] for m in meta],
                             "retryable": pa.array([m[2] for m in meta], pa.bool_()),
                             "key": [f"00000{i:04d}" for i in range(len(meta))]}),
                   images / "00000.parquet")
    failed = tmp_path / "failed"
    out = dedup.main(["--add-failed", str(images), "--failed-seen", str(failed),
                      "--set", "dedup.failed_shards=2"])
    assert out == 0
    stats = datasets.read_stats(str(failed))
    assert stats["add_failed"]["failed_urls"] == 2 and stats["add_failed"]["filter"]["generation_written"] == 1

    rows = [pair(1, "HTTP://BAD.example/gone.jpg#top", "x"), pair(2, "http://bad.example/huge.jpg", "y"),
            pair(3, "http://flaky.example/503.jpg", "z"), pair(4, "http://ok.example/fine.jpg", "w"),
            pair(5, "http://bad.example/nul.jpg", "v"),
            pair(6, "http://bad.example/gone.jpg", "other text, same failed url")]
    rows += [pair(i) for i in range(100, 400)]
    src = write_input(spark, tmp_path / "in", rows)
    seen = tmp_path / "seen"
    stats = run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o", "--failed-seen", failed,
                      "--seen", seen)
    rejected = {r.uid: r for r in spark.read.parquet(str(tmp_path / "o") + "_rejected").collect()}
    assert {u for u, r in rejected.items() if r.status == "failed_before"} == {rows[0][0], rows[1][0], rows[5][0]}
    assert "failed-URL filter" in rejected[rows[0][0]].error_message
    assert stats["failed_url_drops"] == 3 and stats["output_rows"] == len(rows) - 3
    assert stats["failed_filter"]["generation_read"] == 1
    # failed rows are not added to the seen filter: a later run, with the failed filter off, keeps them
    again = run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o2", "--seen", seen)
    assert again["output_rows"] == 3


@pytest.mark.slow
def test_seen_filter_on_s3_through_fsspec(spark, dcfg, tmp_path, moto_s3):
    """Tasks load and write their shards on S3 (a moto server on loopback); Spark's own parquet IO
    stays local, as in the rest of the suite."""
    moto_s3.bucket("dedup-filters")
    cfg = dcfg.with_overrides(["storage.storage_options.key=testing", "storage.storage_options.secret=testing",
                               "storage.storage_options.client_kwargs={endpoint_url: '%s', "
                               "region_name: us-east-1}" % moto_s3.endpoint])
    src = write_input(spark, tmp_path / "in", [pair(i) for i in range(300)])
    s1 = run_dedup(spark, cfg, "--input", src, "--output", tmp_path / "o1", "--seen", "s3://dedup-filters/seen")
    s2 = run_dedup(spark, cfg, "--input", src, "--output", tmp_path / "o2", "--seen", "s3://dedup-filters/seen")
    assert s1["output_rows"] == 300 and s2["output_rows"] == 0 and s2["bloom_drops"] == 300
    store = BloomStore("s3://dedup-filters/seen", "pair", cfg.get("storage.storage_options"))
    assert store.current_generation() == 2
    store.verify(store.manifest(2), full=True)


def test_key_probes_see_only_key_columns_and_write_the_next_generation(tmp_path):
    """The Arrow UDF bodies on their own (no Spark): candidates held by the published shard are
    seen, the other candidates are added to the next generation, non-candidates are left alone."""
    import numpy as np

    store = BloomStore(str(tmp_path / "seen"), "pair")
    plan = store.plan(None, store.next_generation(None), fresh=(1, 1000, 0.001))
    old_keys = [f"old {i}" for i in range(100)]
    shard = plan.load(0).copy()
    shard.add(old_keys)
    plan.write(shard)
    store.publish(plan, None, 1000, 0.001)
    plan = store.plan(store.manifest(1), store.next_generation(1))

    keys = old_keys[:40] + [f"new {i}" for i in range(60)]
    raw = bloom.digests(keys).astype(">u8").tobytes()
    digests = pa.array([raw[32 * i:32 * (i + 1)] for i in range(len(keys))], pa.binary())
    candidate = np.ones(len(keys), bool)
    candidate[[0, 50]] = False          # an old key and a new key that are not representatives
    batches = [(pa.array(np.zeros(50, np.int32)), digests.slice(0, 50), pa.array(candidate[:50])),
               (pa.array(np.zeros(50, np.int32)), digests.slice(50), pa.array(candidate[50:]))]
    seen = np.concatenate(list(probe.probe_seen(plan, iter(batches))))
    assert seen[1:40].all() and not seen[0]          # old candidates seen, the non-candidate not
    assert seen[40:].sum() <= 2                      # new keys: only false positives
    written = BloomStore(str(tmp_path / "seen"), "pair").plan(None, None, fresh=(1, 1000, 0.001))
    written.read_entries = [{"path": "gen-000002/shard-00000.bloom"}]
    new_bits = written.load(0)
    added = [k for k, s, c in zip(keys[40:], seen[40:], candidate[40:]) if c and not s]
    assert new_bits.contains(added).all() and new_bits.contains(old_keys).all()
    assert new_bits.keys_added == 100 + len(added)

    failed = np.concatenate(list(probe.probe_failed(plan, iter(b[:2] for b in batches))))
    assert failed[:40].all() and failed[40:].sum() <= 2
