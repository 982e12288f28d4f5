"""Hash schemes of the dedup key: two xxhash64 (scheme 2, new filters) beside SHA-256 (scheme 1,
filters built before). A filter is probed with the scheme it was built with, never a mix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_dedup import CRAWLS, pair, run_dedup, uids, write_input
from udfs.dedup import bloom, dedup_keys
from udfs.dedup.bloom import HASH_SCHEME_SHA256_DOUBLE as SHA
from udfs.dedup.bloom import HASH_SCHEME_XXH64_PAIR as XXH
from udfs.dedup.bloom_store import BloomStore


@pytest.fixture(scope="module")
def dcfg(cfg):
    return cfg.with_overrides(["dedup.shards=2", "dedup.expected_keys=20000",
                               "dedup.failed_shards=2", "dedup.failed_expected_keys=5000"])


def test_xxh64_matches_the_reference_vectors():
    # published XXH64 test vectors (seed 0) and one input over 32 bytes (the 4-lane loop)
    assert bloom.xxh64(b"") == 0xEF46DB3751D8E999
    assert bloom.xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert bloom.xxh64(b"abc") == 0x44BC2CF5AD770999


def test_jvm_xxhash_digests_and_shards_match_python(spark):
    from spark_jobs import columns
    cases = [("http://Example.Com/a.jpg#frag", "  a\u00a0red\t\ncircle "), (None, None),
             ("HTTPS://user:PW@CDN.example.ORG:8443/Img.PNG?W=1#f", "x\u2028y \u00e9\u4e2d\U0001F600"),
             ("http://x/" + "p" * 40, "a caption longer than thirty-two bytes, to reach XXH64's lanes"),
             ("http://x/", ""), ("http://x/abcd", "1234567")]
    df = spark.createDataFrame(cases, "url string, text string")
    df = columns.with_key_digest(df, "url", "text", "d", "s", 5, XXH)
    df = columns.with_key_digest(df, "url", None, "ud", "us", 3, XXH)
    assert {"d", "d_b", "ud", "ud_b"} <= set(df.columns)
    rows = df.collect()
    for (url, text), row in zip(cases, rows):
        for key, cols, shard, count in ((dedup_keys.pair_key(url, text), ("d", "d_b"), row.s, 5),
                                        (dedup_keys.url_key(url), ("ud", "ud_b"), row.us, 3)):
            words = bloom.digests([key], XXH)
            jvm = bloom.digests_from_longs(np.array([row[cols[0]]]), np.array([row[cols[1]]]))
            assert np.array_equal(words, jvm), (url, text)
            assert shard == int(bloom.shard_of(words, count)[0])


def test_a_shard_of_another_scheme_is_refused_not_probed(tmp_path):
    store = BloomStore(str(tmp_path / "seen"), "pair")
    plan = store.plan(None, store.next_generation(None), fresh=(1, 1000, 0.01), fresh_scheme=XXH)
    bf = plan.load(0).copy()
    bf.add(["k1", "k2"])
    plan.write(bf)
    man = store.publish(plan, None, 1000, 0.01)
    assert man.hash_scheme == XXH and store.manifest(1).hash_scheme == XXH
    assert store.plan(store.manifest(1)).load(0).contains(["k1", "k2"]).all()
    # a SHA-256 shard put in its place: the manifest says scheme 2, the header 1
    sha = bloom.BloomFilter(plan.num_bits, plan.num_hashes, shard_index=0, shard_count=1)
    sha.add(["k1"])
    sha.save(str(tmp_path / "seen" / "gen-000001" / "shard-00000.bloom"))
    with pytest.raises(bloom.CorruptFilterError, match="hash scheme"):
        store.plan(store.manifest(1)).load(0)
    with pytest.raises(ValueError, match="do not fit hash scheme"):
        bf.contains_digests(bloom.digests(["k1"], SHA))


def _strip_scheme(root):
    """Make a store look like one written before hash schemes existed (no hash_scheme key)."""
    for path in root.glob("gen-*/manifest.json"):
        obj = json.loads(path.read_text())
        obj.pop("hash_scheme")
        path.write_text(json.dumps(obj))


@pytest.mark.slow
def test_an_old_sha256_filter_keeps_being_probed_with_sha256(spark, dcfg, tmp_path):
    seen = tmp_path / "seen"
    first = [pair(i) for i in range(600)]
    src1 = write_input(spark, tmp_path / "in1", first)
    old = dcfg.with_overrides(["dedup.hash_scheme=1"])
    s1 = run_dedup(spark, old, "--input", src1, "--output", tmp_path / "o1", "--seen", seen)
    assert s1["seen_filter"]["hash_scheme"] == SHA and s1["output_rows"] == 600
    _strip_scheme(seen)
    assert BloomStore(str(seen), "pair").manifest(1).hash_scheme == SHA

    # today's config (scheme 2 for new filters) reads the old filter with SHA-256: no false negative
    src2 = write_input(spark, tmp_path / "in2", first[:300] + [pair(i, crawl=CRAWLS[1]) for i in range(5000, 5300)])
    s2 = run_dedup(spark, dcfg, "--input", src2, "--output", tmp_path / "o2", "--seen", seen)
    assert s2["seen_filter"]["hash_scheme"] == SHA
    kept = uids(spark, tmp_path / "o2")
    assert not kept & {r[0] for r in first}           # every old pair found
    assert len(kept) >= 295
    store = BloomStore(str(seen), "pair")
    man2 = store.manifest(2)
    assert man2.hash_scheme == SHA
    store.verify(man2, full=True)                     # the new generation's shards are SHA-256 too
    assert all(store.plan(man2).load(s).hash_scheme == SHA for s in range(man2.shard_count))


@pytest.mark.slow
def test_a_new_filter_uses_xxhash_and_finds_every_pair_again(spark, dcfg, tmp_path):
    seen = tmp_path / "seen"
    rows = [pair(i) for i in range(500)]
    src = write_input(spark, tmp_path / "in", rows + rows[:50])
    s1 = run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o1", "--seen", seen)
    assert s1["seen_filter"]["hash_scheme"] == XXH
    assert s1["output_rows"] == 500 and s1["exact_duplicates"] == 50
    man = BloomStore(str(seen), "pair").manifest(1)
    assert man.hash_scheme == XXH
    assert json.loads((seen / "gen-000001" / "manifest.json").read_text())["format_version"] == 2
    s2 = run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o2", "--seen", seen)
    assert s2["output_rows"] == 0 and s2["bloom_drops"] == 500 and s2["exact_duplicates"] == 50


@pytest.mark.slow
def test_both_schemes_pick_the_same_representatives(spark, dcfg, tmp_path):
    rows = [pair(i) for i in range(150)]
    # ties on record_date (smallest uid wins), spellings of one key, exact copies
    rows += [pair(2000, "http://dup.example/b.jpg", "b"), pair(2001, "http://DUP.example/b.jpg", "b"),
             pair(2002, "http://dup.example/b.jpg#x", " b ", crawl=CRAWLS[1]),
             pair(1000, "http://dup.example/a.jpg", "same  text", date="2024-03-05"),
             pair(1001, "HTTP://DUP.example/a.jpg#x", "same text", date="2024-03-02", crawl=CRAWLS[1])]
    rows += [pair(i) for i in range(40)]   # identical copies: either one is the same row
    src = write_input(spark, tmp_path / "in", rows)
    out = {}
    for scheme in (SHA, XXH):
        cfg = dcfg.with_overrides([f"dedup.hash_scheme={scheme}"])
        stats = run_dedup(spark, cfg, "--input", src, "--output", tmp_path / f"o{scheme}")
        rejected = spark.read.parquet(str(tmp_path / f"o{scheme}") + "_rejected")
        out[scheme] = (uids(spark, tmp_path / f"o{scheme}"), stats["exact_duplicates"],
                       {(r.uid, r.status, r.error_message, r.crawl) for r in rejected.collect()})
    assert out[SHA] == out[XXH]
    kept, dups, _ = out[XXH]
    b_winner = min(rows[150:153], key=lambda r: r[0])[0]
    assert b_winner in kept and rows[154][0] in kept and rows[153][0] not in kept
    assert dups == 2 + 1 + 40
