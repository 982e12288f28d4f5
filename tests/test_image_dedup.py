"""Image dedup layers: the pure rules (udfs/image_dedup/layers.py) and the `image-dedup` stage on a
fabricated download output whose groups of copies, and the copy each group keeps, are planted by
hand."""

from __future__ import annotations

import argparse
import io
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from udfs.download.image_hash import to_signed
from udfs.image_dedup import layers as dd

# --- pure rules ------------------------------------------------------------------------------------


def test_band_layout_covers_64_bits_and_pigeonhole_holds():
    for bands in (1, 2, 3, 4, 5, 7, 8):
        layout = dd.band_layout(bands)
        assert sum(w for _, w in layout) == 64
        covered = set()
        for shift, width in layout:
            covered |= set(range(shift, shift + width))
        assert covered == set(range(64))
    with pytest.raises(ValueError):
        dd.band_layout(0)
    # 4 bands: a pair 3 bits apart always shares a band, whichever bits differ
    rng = random.Random(0)
    for _ in range(200):
        h = rng.getrandbits(64)
        flipped = h
        for bit in rng.sample(range(64), 3):
            flipped ^= 1 << bit
        assert any(x == y for x, y in zip(dd.band_values(h, 4), dd.band_values(flipped, 4)))
    # ... but 4 flips, one per band, share none
    h = 0
    four = sum(1 << b for b in (0, 16, 32, 48))
    assert not any(x == y for x, y in zip(dd.band_values(h, 4), dd.band_values(four, 4)))


def test_rules_rank_as_the_issue_says():
    rows = [("2024-05-02", "a"), (None, "0"), ("2024-05-01", "z"), ("2024-05-01", "b")]
    assert min(rows, key=lambda r: dd.exact_rank(*r)) == ("2024-05-01", "b")
    big = (640, 480, "2024-06-01", "z")
    small_early = (320, 240, "2024-01-01", "a")
    assert min([small_early, big], key=lambda r: dd.near_rank(*r)) == big
    same_size = [(100, 100, "2024-02-01", "a"), (100, 100, "2024-01-01", "b")]
    assert min(same_size, key=lambda r: dd.near_rank(*r))[3] == "b"


def test_union_find_and_components():
    labels = dd.components(6, [(1, 2), (4, 5), (2, 3)])
    assert labels == [0, 1, 1, 1, 4, 4]
    uf = dd.UnionFind()
    uf.union("x", "y")
    assert uf.find("x") == uf.find("y") and uf.find("z") == "z"


def test_banded_pairs_find_what_all_pairs_finds_up_to_bands_minus_one():
    rng = random.Random(5)
    hashes = []
    for _ in range(60):
        base = rng.getrandbits(64)
        hashes.append(base)
        for _ in range(rng.randrange(3)):
            h = base
            for bit in rng.sample(range(64), rng.randrange(4)):
                h ^= 1 << bit
            hashes.append(h)
    exact = dd.near_pairs(hashes, 3)
    assert exact and dd.near_pairs(hashes, 3, bands=4) == exact
    # at distance 8 the bands may miss pairs, never invent them
    assert set(dd.near_pairs(hashes, 8, bands=4)) <= set(dd.near_pairs(hashes, 8))


def _planted_hashes(seed: int, groups: int = 400, crowded: int = 120) -> list[int]:
    """Random 64-bit hashes, near copies of them (1-8 bits flipped), and `crowded` hashes sharing
    their top 16 bits (one overfull bucket of band 0, as near-blank images make), all distinct."""
    rng = random.Random(seed)
    hashes = []
    for _ in range(groups):
        base = rng.getrandbits(64)
        hashes.append(base)
        for _ in range(rng.randrange(3)):
            h = base
            for bit in rng.sample(range(64), rng.randrange(1, 9)):
                h ^= 1 << bit
            hashes.append(h)
    crowd = rng.getrandbits(16) << 48
    base = crowd | rng.getrandbits(48)
    hashes += [crowd | rng.getrandbits(48) for _ in range(crowded // 2)]
    hashes += [base ^ (1 << rng.randrange(48)) ^ (1 << rng.randrange(48)) for _ in range(crowded // 2)]
    return list(dict.fromkeys(hashes))


@pytest.mark.parametrize("distance", [0, 3, 6, 8])
def test_bucket_pairs_over_all_bands_are_the_banded_pairs_once(distance):
    hashes = _planted_hashes(7)
    expected = dd.near_pairs(hashes, distance, bands=4)
    nodes = np.arange(len(hashes)) * 3 + 100   # node ids are not row positions
    for big, block in ((2048, 1024), (5, 4)):  # (5, 4): the crowded bucket goes through the tiles
        got = []
        for band in range(4):
            a, b, d = dd.bucket_pairs(nodes, dd.as_uint64(hashes), band, 4, distance, big=big, block=block)
            got += [((x - 100) // 3, (y - 100) // 3, int(z)) for x, y, z in zip(a, b, d)]
        assert sorted(got) == expected   # sorted list: no pair twice
    if distance == 3:
        assert expected == dd.near_pairs(hashes, 3) and len(expected) > 100


def test_bucket_pairs_of_one_group_compare_only_equal_band_values():
    # 1 bit apart in band 1 (bits 32-47): bands 0, 2 and 3 are shared, band 0 emits the pair
    a, b = 0x1234_5678_9ABC_DEF0, 0x1234_5679_9ABC_DEF0
    got = [dd.bucket_pairs([1, 2], dd.as_uint64([a, b]), band, 4, 6) for band in range(4)]
    assert [len(x[0]) for x in got] == [1, 0, 0, 0] and got[0][2].tolist() == [1]
    # 1 bit apart in band 3: bands 0-2 shared, still only band 0
    assert [len(dd.bucket_pairs([1, 2], dd.as_uint64([a, a ^ 1]), band, 4, 6)[0]) for band in range(4)] == [1, 0, 0, 0]


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_semdedup_keeps_the_row_nearest_the_centroid_and_names_it():
    centre = _unit([1.0, 0.0, 0.0])
    a = _unit([1.0, 0.05, 0.0])          # nearest the centroid
    a2 = _unit([1.0, 0.09, 0.0])         # a near copy of a, a little farther out
    b = _unit([0.0, 0.3, 1.0])           # far from everything
    emb = np.stack([a2, b, a])
    kept_by, cosine, _ = dd.semdedup_cluster(emb, centre, eps=0.01)
    assert kept_by.tolist() == [2, -1, -1]
    assert cosine[0] == pytest.approx(float(a2 @ a), abs=1e-5) and np.isnan(cosine[1])


def test_semdedup_greedy_drops_only_rows_close_to_a_kept_row():
    # x nearest the centroid; y within eps of x (dropped); z within eps of y but not of x (kept,
    # since its only close neighbour was dropped).
    centre = _unit([1.0, 0.0])
    angles = np.radians([0.0, 8.0, 16.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    eps = 1 - np.cos(np.radians(10.0))
    kept_by, _, _ = dd.semdedup_cluster(emb, centre, eps=eps, block=2)
    assert kept_by.tolist() == [-1, 0, -1]


def test_semdedup_blocks_give_the_same_answer():
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=(40, 8)))
    emb = _unit(np.concatenate([base, base + 0.02 * rng.normal(size=(40, 8))]))
    centre = _unit(emb.mean(axis=0))
    ref = dd.semdedup_cluster(emb, centre, 0.02, block=1000)[0]
    for block in (1, 7, 33):
        assert dd.semdedup_cluster(emb, centre, 0.02, block=block)[0].tolist() == ref.tolist()
    assert (ref >= 0).sum() >= 30


# --- the stage -------------------------------------------------------------------------------------

def _flip(h: int, bits) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def _row(key, uid, status="success", sha=None, phash=None, w=100, h=100):
    return {"key": key, "uid": uid, "url": f"http://127.0.0.1/{uid}.jpg", "text": f"caption {uid}",
            "page_url": None, "shard": 0, "status": status, "error_message": None, "http_status": 200,
            "content_type": "image/jpeg", "original_width": w, "original_height": h, "width": w, "height": h,
            "bytes": 9000, "sha256": sha, "download_seconds": 0.1, "retryable": False, "attempts": 1,
            "phash": None if phash is None else to_signed(phash)}


BASE_A = 0x0123456789ABCDEF
BASE_B = 0xF0F0F0F00F0F0F0F
FAR = [0x5555555555555555, 0xAAAAAAAAAAAAAAAA, 0x0000FFFF0000FFFF]


def _planted():
    rows = [
        # exact group: same sha256; e1 has the earliest record_date -> kept
        _row("000000000", "u-e0", sha="aa" * 32, phash=FAR[0]),
        _row("000000001", "u-e1", sha="aa" * 32, phash=FAR[0]),
        _row("000000002", "u-e2", sha="aa" * 32, phash=FAR[0]),
        # near group A: a chain a0 -2- a1 -4- a2 (a0..a2 6 bits apart); a2 is the largest -> kept
        _row("000000003", "u-a0", sha="01" * 32, phash=BASE_A, w=200, h=100),
        _row("000000004", "u-a1", sha="02" * 32, phash=_flip(BASE_A, [1, 17]), w=150, h=150),
        _row("000000005", "u-a2", sha="03" * 32, phash=_flip(BASE_A, [1, 17, 33, 49, 50, 51]), w=300, h=200),
        # near group B: same size, both within 3 bits; record dates decide: b1 earlier -> kept
        _row("000000006", "u-b0", sha="04" * 32, phash=BASE_B),
        _row("000000007", "u-b1", sha="05" * 32, phash=_flip(BASE_B, [5, 6, 7])),
        # unrelated, and a near copy of FAR[1] that is a failure (must stay as it is)
        _row("000000008", "u-x0", sha="06" * 32, phash=FAR[1]),
        _row("000000009", "u-x1", status="failed_to_download", phash=None),
        _row("000000010", "u-x2", status="too_small", sha="aa" * 32, phash=None),
        _row("000000011", "u-x3", sha="07" * 32, phash=FAR[2]),
        _row("000000012", "u-x4", sha="08" * 32, phash=None),   # success without a hash
        # the very same pHash, different bytes (e.g. two blank images): the larger one is kept
        _row("000000013", "u-z0", sha="09" * 32, phash=0x1111111111111111, w=100, h=100),
        _row("000000014", "u-z1", sha="0a" * 32, phash=0x1111111111111111, w=120, h=100),
    ]
    dates = {"u-e0": "2024-05-03T00:00:00Z", "u-e1": "2024-05-01T00:00:00Z", "u-e2": None,
             "u-b0": "2024-05-09T00:00:00Z", "u-b1": "2024-05-02T00:00:00Z"}
    return rows, dates


def _write_download_output(folder, rows, pairs_folder, dates):
    from udfs.download.download_worker import metadata_table

    folder.mkdir(parents=True)
    pq.write_table(metadata_table(rows[:7]), folder / "00000.parquet")
    pq.write_table(metadata_table(rows[7:]), folder / "00001.parquet")
    import pandas as pd

    pairs_folder.mkdir(parents=True)
    pd.DataFrame({"uid": [r["uid"] for r in rows], "url": [r["url"] for r in rows],
                  "text": [r["text"] for r in rows],
                  "record_date": [dates.get(r["uid"]) for r in rows]}).to_parquet(pairs_folder / "p.parquet")


def _run_stage(spark, cfg, images, out, pairs=None, overrides=()):
    from spark_jobs import image_dedup
    from spark_jobs.config import load_config

    if overrides:
        cfg = load_config("local", overrides=[f"{k}={v}" for k, v in overrides])
    return image_dedup.run(spark, cfg, argparse.Namespace(input=str(images), output=str(out),
                                                          pairs=str(pairs) if pairs else None))


def _read(out):
    import pyarrow.dataset as pads

    return {r["uid"]: r for r in pads.dataset(str(out), format="parquet").to_table().to_pylist()}


def test_stage_marks_planted_groups(spark, cfg, tmp_path):
    rows, dates = _planted()
    images, pairs, out = tmp_path / "images", tmp_path / "pairs", tmp_path / "dedup"
    _write_download_output(images, rows, pairs, dates)
    stats = _run_stage(spark, cfg, images, out, pairs)
    got = _read(out)
    assert len(got) == len(rows) and stats["metadata_rows"] == stats["input_rows"] == len(rows)
    status = {u: r["status"] for u, r in got.items()}
    assert status == {
        "u-e0": "duplicate_image", "u-e1": "success", "u-e2": "duplicate_image",
        "u-a0": "near_duplicate", "u-a1": "near_duplicate", "u-a2": "success",
        "u-b0": "near_duplicate", "u-b1": "success",
        "u-x0": "success", "u-x1": "failed_to_download", "u-x2": "too_small", "u-x3": "success",
        "u-x4": "success", "u-z0": "near_duplicate", "u-z1": "success"}
    assert got["u-e0"]["duplicate_of_uid"] == "u-e1" and got["u-e0"]["duplicate_of_key"] == "000000001"
    assert "u-e1" in got["u-e2"]["error_message"] and "sha256" in got["u-e2"]["error_message"]
    # distances to the kept row, not to the neighbour that linked them
    assert got["u-a0"]["phash_distance"] == 6 and got["u-a1"]["phash_distance"] == 4
    assert got["u-a0"]["error_message"] == "phash distance 6 to kept uid u-a2 (key 000000005)"
    assert got["u-b0"]["duplicate_of_uid"] == "u-b1" and got["u-b0"]["phash_distance"] == 3
    assert got["u-x2"]["duplicate_of_uid"] is None      # failures are never dedup candidates
    assert got["u-z0"]["duplicate_of_uid"] == "u-z1" and got["u-z0"]["phash_distance"] == 0
    assert stats["dropped"] == {"duplicate_image": 2, "near_duplicate": 4}
    assert stats["output_rows"] == 7 and stats["record_dates"] is True
    assert stats["layers"]["near"]["no_phash"] == 1
    assert stats["layers"]["near"]["components"] == 3


def test_stage_without_record_dates_orders_by_uid_and_can_be_narrowed(spark, cfg, tmp_path):
    rows, dates = _planted()
    images, pairs, out = tmp_path / "images", tmp_path / "pairs", tmp_path / "dedup"
    _write_download_output(images, rows, pairs, dates)
    # no pairs: uid order (u-e0 kept); distance 3 with 4 bands: the a0-a2 link (6) is gone but
    # a0-a1 (2) stays; a1-a2 is 4 bits: not linked
    stats = _run_stage(spark, cfg, images, out, None, overrides=[("image_dedup.phash_distance", 3)])
    got = _read(out)
    assert stats["record_dates"] is False
    assert got["u-e0"]["status"] == "success" and got["u-e1"]["duplicate_of_uid"] == "u-e0"
    assert got["u-a2"]["status"] == "success"
    assert got["u-a1"]["status"] == "success" and got["u-a0"]["duplicate_of_uid"] == "u-a1"
    assert got["u-b0"]["duplicate_of_uid"] == "u-b0" or got["u-b1"]["duplicate_of_uid"] == "u-b0"


def test_stage_disabled_writes_only_stats_and_clip_score_reads_the_download(spark, cfg, tmp_path):
    from spark_jobs.clip_score import image_dedup_source

    rows, dates = _planted()
    images, pairs, out = tmp_path / "images", tmp_path / "pairs", tmp_path / "dedup"
    _write_download_output(images, rows, pairs, dates)
    stats = _run_stage(spark, cfg, images, out, pairs, overrides=[("image_dedup.enabled", "false")])
    assert stats["enabled"] is False
    assert not list(out.glob("*.parquet"))
    assert image_dedup_source(str(out), None) == (None, str(images))
    _run_stage(spark, cfg, images, tmp_path / "on", pairs)
    assert image_dedup_source(str(tmp_path / "on"), None) == (str(tmp_path / "on"), str(images))
    assert image_dedup_source(str(images), None) == (None, str(images))


def test_spark_components_match_union_find_on_random_groups(spark):
    from spark_jobs.columns import connected_components

    rng = random.Random(11)
    edges = []
    n = 300
    for _ in range(260):
        a, b = rng.randrange(n), rng.randrange(n)
        if a != b:
            edges.append((min(a, b), max(a, b)))
    # a long chain, the slow case for label propagation
    edges += [(1000 + i, 1001 + i) for i in range(40)]
    df = spark.createDataFrame(sorted(set(edges)), "a long, b long")
    comps, rounds, converged = connected_components(df, 40)
    got = {r["node"]: r["comp"] for r in comps.collect()}
    uf = dd.UnionFind()
    for a, b in edges:
        uf.union(a, b)
    expected = {}
    for group in uf.groups():
        for item in group:
            expected[item] = min(group)
    assert converged and got == expected
    assert rounds < 20   # pointer jumping: far fewer rounds than the chain's 40 hops


def test_spark_banded_pairs_match_the_pure_banded_pairs(spark):
    from spark_jobs.columns import banded_pairs

    hashes = _planted_hashes(13)
    rows = [(i * 5 + 7, to_signed(h)) for i, h in enumerate(hashes)]
    df = spark.createDataFrame(rows, "node long, phash long")
    for distance in (3, 6):
        got = sorted(((r["a"] - 7) // 5, (r["b"] - 7) // 5, r["d"]) for r in banded_pairs(df, distance, 4).collect())
        assert got == dd.near_pairs(hashes, distance, bands=4)
    # fewer group bits (one group per band) and 3 bands: the same rule
    got = sorted(((r["a"] - 7) // 5, (r["b"] - 7) // 5, r["d"])
                 for r in banded_pairs(df, 6, 3, group_bits=0).collect())
    assert got == dd.near_pairs(hashes, 6, bands=3)


def test_download_worker_records_phash(tmp_path):
    from tests.gen.image_server import ImageServer
    from tests.gen.photos import jpeg, photo_like
    from udfs.download.download_worker import download_shard
    from udfs.download.image_hash import hamming, phash

    img = photo_like(1, (400, 300))
    with ImageServer() as srv:
        srv.add("/a.jpg", jpeg(img))
        section = {"thread_count": 2, "allowed_cidrs": "127.0.0.0/8", "min_image_bytes": 100,
                   "retries": 0, "image_size": 64}
        download_shard(0, [{"key": "000000000", "url": srv.url("/a.jpg"), "text": "t"}], section, str(tmp_path))
    meta = pq.read_table(tmp_path / "00000.parquet").to_pylist()[0]
    assert meta["status"] == "success"
    assert hamming(meta["phash"], phash(img)) <= 4
    _ = io  # noqa: F841


# --- filter: eval decontamination and SemDeDup ------------------------------------------------------

def _scored_with_phash(folder, records):
    import pandas as pd
    import pyarrow as pa

    from tests.test_filter import SCORED_ARROW

    schema = SCORED_ARROW.append(pa.field("phash", pa.int64()))
    defaults = {"page_url": "http://127.0.0.1/page", "shard": 0, "error_message": None, "http_status": 200,
                "content_type": "image/jpeg", "original_width": 64, "original_height": 64, "width": 64,
                "height": 64, "bytes": 10000, "sha256": "0" * 64, "download_seconds": 0.1, "retryable": False,
                "similarity_multilingual": None, "tar_path": "/nowhere/00000.tar", "phash": None}
    pdf = pd.DataFrame([{**defaults, **r} for r in records])
    pdf["phash"] = pd.array([r.get("phash") for r in records], dtype="Int64")   # no float round trip
    table = pa.Table.from_pandas(pdf[schema.names], preserve_index=False, schema=schema)
    pq.write_to_dataset(table, str(folder), partition_cols=["status"])


def _uid(i, text):
    from udfs.ids import pair_uid

    return pair_uid(f"http://127.0.0.1/{i}.jpg", text)


def test_filter_removes_eval_overlap_and_semantic_duplicates(spark, tmp_path):
    from spark_jobs import filter as filter_stage
    from spark_jobs.config import load_config
    from tests.gen.photos import photo_like
    from udfs.clip import embeddings
    from udfs.download.image_hash import phash_bytes

    rng = np.random.default_rng(7)
    dim = 16
    v = _unit(rng.normal(size=dim))
    vecs = [_unit(v + 0.01 * rng.normal(size=dim)) for _ in range(3)]          # r0..r2: one picture
    vecs += [_unit(rng.normal(size=dim)) for _ in range(5)]                     # r3..r7: distinct
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    buf = io.BytesIO()
    photo_like(42).save(buf, "PNG")
    (eval_dir / "eval_a.png").write_bytes(buf.getvalue())
    np.save(eval_dir / "embeddings.npy", np.stack([vecs[6] + 0.001 * rng.normal(size=dim)]).astype(np.float32))
    (eval_dir / "ids.txt").write_text("bench-item-0\n")
    texts = ["A red bicycle leaning on a brick wall", "A red bike against a brick wall",
             "Red bicycle parked by the wall", "Fresh bread on a wooden table",
             "Snowy mountains above a quiet lake", "A cat sleeping on the sofa",
             "Sailing boats in the harbour at dusk", "Old stone bridge over the river"]
    records = []
    for i, (t, e) in enumerate(zip(texts, vecs)):
        records.append({"key": f"{i:09d}", "uid": _uid(i, t), "url": f"http://127.0.0.1/{i}.jpg", "text": t,
                        "status": "success", "similarity": 0.9,
                        "image_embedding": embeddings.encode(e), "text_embedding": embeddings.encode(e),
                        "phash": to_signed(rng.integers(0, 2**62) * 2 + 1) if i != 5 else
                        to_signed((phash_bytes(buf.getvalue()) & ((1 << 64) - 1)) ^ 1)})
    records.append({"key": "000000099", "uid": _uid(99, "gone"), "url": "http://127.0.0.1/99.jpg", "text": "gone",
                    "status": "failed_to_download", "similarity": None, "image_embedding": None,
                    "text_embedding": None})
    scored, out = tmp_path / "scored", tmp_path / "dataset"
    _scored_with_phash(scored, records)
    cfg = load_config("local", overrides=[
        "filter.language_detector=lingua-low", "filter.semdedup.enabled=true", "filter.semdedup.clusters=1",
        "filter.semdedup.scope=global", "filter.semdedup.eps=0.05", f"filter.eval_images={eval_dir}",
        "filter.embeddings_per_file=100"])
    stats = filter_stage.run(spark, cfg, argparse.Namespace(input=str(scored), output=str(out),
                                                            rejected_output=None))
    import pyarrow.dataset as pads

    names = {r["uid"]: f"u{int(r['key'])}" for r in records}
    rej = {names[r["uid"]]: r for r in pads.dataset(str(tmp_path / "dataset_rejected"), format="parquet",
                                             partitioning="hive").to_table().to_pylist()}
    assert rej["u5"]["status"] == "eval_overlap"
    assert rej["u5"]["error_message"] == "eval item eval_a.png: phash distance 1"
    assert rej["u6"]["status"] == "eval_overlap"
    msg = rej["u6"]["error_message"]
    assert msg.startswith("eval item bench-item-0: cosine ") and float(msg.rsplit(" ", 1)[1]) > 0.99
    # SemDeDup: k = 1, so the centroid is the normalised mean; the copy nearest it is kept
    mean = _unit(np.mean([embeddings.decode(embeddings.encode(x)) for x in vecs], axis=0))
    kept = max(range(3), key=lambda i: float(embeddings.decode(embeddings.encode(vecs[i])) @ mean))
    dropped = sorted(f"u{i}" for i in range(3) if i != kept)
    assert sorted(u for u, r in rej.items() if r["status"] == "semantic_duplicate") == dropped
    for u in dropped:
        msg = rej[u]["error_message"]
        assert f"kept uid {records[kept]['uid']} " in msg and float(msg.split()[1]) > 0.95
    assert rej["u99"]["status"] == "failed_to_download"
    assert stats["kept"] == 4 and stats["balanced"] and stats["input_rows"] == 9
    assert stats["hygiene"]["eval_overlap"] == 2 and stats["hygiene"]["semantic_duplicate"] == 2
    assert stats["hygiene"]["eval_items"] == 2


def test_eval_set_errors_are_config_errors(tmp_path):
    from udfs.image_dedup.layers import EvalSetError, load_eval_set

    with pytest.raises(EvalSetError, match="not found"):
        load_eval_set(str(tmp_path / "nope"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "readme.md").write_text("x")
    with pytest.raises(EvalSetError, match="no images"):
        load_eval_set(str(tmp_path / "e"))
    np.save(tmp_path / "e" / "embeddings.npy", np.ones((2, 4), np.float32))
    with pytest.raises(EvalSetError, match="ids"):
        load_eval_set(str(tmp_path / "e"))
    (tmp_path / "e" / "ids.txt").write_text("a\n")
    with pytest.raises(EvalSetError, match="1 ids"):
        load_eval_set(str(tmp_path / "e"))


# --- the chain: clipcrawl run ------------------------------------------------------------------------

@pytest.mark.slow
def test_chain_copies_end_as_one_row_and_eval_images_are_removed(spark, tmp_path):
    """Through `clipcrawl run` (wat-extract .. filter, tiny CLIP, every score kept): four copies of
    one photo under four URLs (two with the same bytes, one re-encoded at q40, one resized to 50%)
    end as one subset row; two photos whose copies are in the eval folder end as eval_overlap."""
    import pyarrow.dataset as pads

    from demo.__main__ import PRESET
    from spark_jobs import run as pipeline
    from spark_jobs.config import load_config
    from tests.gen.image_server import ImageServer
    from tests.gen.photos import jpeg, photo_like
    from tests.gen.wat_writer import pages_for_images, write_wat

    base = photo_like(500, (400, 300))
    original = jpeg(base)
    group = {"/g/a.jpg": original, "/g/b.jpg": original, "/g/c.jpg": jpeg(base, 40),
             "/g/d.jpg": jpeg(base.resize((200, 150)))}
    distinct_imgs = {f"/d/{i}.jpg": photo_like(600 + i, (320, 240)) for i in range(6)}
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for name in ("/d/0.jpg", "/d/1.jpg"):   # the eval set holds PNG copies of two of them
        distinct_imgs[name].save(eval_dir / (name.strip("/").replace("/", "_")[:-4] + ".png"))
    root = tmp_path / "run"
    with ImageServer() as srv:
        links = []
        for i, (path, body) in enumerate({**group, **{p: jpeg(im) for p, im in distinct_imgs.items()}}.items()):
            srv.add(path, body, "image/jpeg")
            links.append((srv.url(path), f"a photograph of scene number {i}"))
        pages = pages_for_images(links, page_base=srv.url("/pages/"), per_page=3, seed=1)
        wat = tmp_path / "crawl-data" / "CC-MAIN-2024-22" / "segments" / "1" / "wat" / "x.warc.wat.gz"
        write_wat(wat, pages, seed=1)
        cfg = load_config("local", config_file=str(PRESET), overrides=[
            f"storage.root={root}", f'run.input=["{wat}"]', "download.allowed_cidrs=127.0.0.0/8",
            "download.thread_count=4", "clip.batch_size=8", "filter.language_detector=lingua-low",
            "filter.thresholds.en=-1", "filter.thresholds.multi=-1", "filter.thresholds.nolang=-1",
            f"filter.eval_images={eval_dir}", "image_dedup.near=true"])   # the preset turns it off for shapes
        pipeline.run(spark, cfg, argparse.Namespace(input=None, paths_file=None, root=None,
                                                    from_stage="wat-extract", to_stage="filter", force=[]))
    kept_urls = []
    for subset in cfg.get("filter.subsets").values():
        folder = root / "dataset" / subset
        if folder.exists() and list(folder.glob("*.parquet")):
            kept_urls += pads.dataset(str(folder), format="parquet").to_table(columns=["URL"]).column("URL").to_pylist()
    kept_paths = sorted("/" + u.split("/", 3)[3] for u in kept_urls)
    group_kept = [p for p in kept_paths if p.startswith("/g/")]
    assert len(group_kept) == 1 and group_kept[0] != "/g/d.jpg", kept_paths   # the smaller copy never wins
    assert sorted(p for p in kept_paths if p.startswith("/d/")) == [f"/d/{i}.jpg" for i in range(2, 6)]
    dedup = {"/" + r["url"].split("/", 3)[3]: r for r in
             pads.dataset(str(root / "images_dedup"), format="parquet").to_table().to_pylist()}
    assert sorted(r["status"] for p, r in dedup.items() if p.startswith("/g/")) == [
        "duplicate_image", "near_duplicate", "near_duplicate", "success"]
    rejected = {"/" + r["url"].split("/", 3)[3]: r for r in
                pads.dataset(str(root / "dataset_rejected"), format="parquet", partitioning="hive")
                .to_table().to_pylist()}
    for i in (0, 1):
        assert rejected[f"/d/{i}.jpg"]["status"] == "eval_overlap"
        assert rejected[f"/d/{i}.jpg"]["error_message"].startswith(f"eval item d_{i}.png: phash distance")
    filter_stats = json.loads((root / "dataset" / "_stats" / "stats.json").read_text())
    assert filter_stats["balanced"] and filter_stats["hygiene"]["eval_overlap"] == 2
    dedup_stats = json.loads((root / "images_dedup" / "_stats" / "stats.json").read_text())
    assert dedup_stats["dropped"] == {"duplicate_image": 1, "near_duplicate": 2}
    # the report's dedup chart counts the same rows from the written data, and the funnel balances
    from reporting.report import build_report, collect, dedup_layer_counts

    counts = dedup_layer_counts(str(root), cfg.get("run.datasets"))
    assert counts["same image bytes (sha256)"] == 1 and counts["pHash near-duplicate"] == 2
    assert counts["eval-set overlap"] == 2 and counts["semantic duplicate (SemDeDup)"] == 0
    funnel = {f.stage: f for f in collect(str(root), cfg.get("run.datasets"), cfg.get("filter.subsets"))["funnel"]}
    assert funnel["image-dedup"].dropped == {"duplicate_image": 1, "near_duplicate": 2}
    assert all(f.accounted for f in funnel.values())
    page = build_report(str(root), cfg.get("run.datasets"), cfg.get("filter.subsets"), str(tmp_path / "report"))
    assert (tmp_path / "report" / "dedup_layers.png").stat().st_size > 5000 and "dedup_layers.png" in open(page).read()


def test_bad_image_dedup_config_is_a_config_error(cfg):
    from spark_jobs.config import ConfigError
    from spark_jobs.image_dedup import validate_section

    good = dict(cfg.section("image_dedup"))
    validate_section(good)
    for key, value in (("phash_distance", 40), ("bands", 0), ("bands", 65), ("max_iterations", 0),
                       ("phash_distance", "6")):
        with pytest.raises(ConfigError, match=f"image_dedup.{key}|bands"):
            validate_section({**good, key: value})
