"""The sharded, generation-numbered filter store: publish, inherit, dead runs, damage; local and S3."""

from __future__ import annotations

import json

import pytest

from udfs import fsio
from udfs.dedup import bloom
from udfs.dedup.bloom_store import CURRENT, BloomStore, shard_file


def _fill(store: BloomStore, plan, keys: list[str]) -> None:
    """What the Spark tasks do: per shard, load, add, write."""
    words = bloom.digests(keys)
    shards = bloom.shard_of(words, plan.shard_count)
    for shard in sorted(set(shards.tolist())):
        bf = plan.load(shard).copy()  # loaded shards are read-only
        bf.add_digests(words[shards == shard])
        plan.write(bf)


def _contains(store: BloomStore, keys: list[str]):
    man = store.manifest(store.current_generation())
    plan = store.plan(man)
    words = bloom.digests(keys)
    shards = bloom.shard_of(words, plan.shard_count)
    return [bool(plan.load(int(s)).contains_digests(words[i:i + 1])[0]) for i, s in enumerate(shards)]


def _publish_run(store, keys, parent_gen=None, shards=4):
    man = store.manifest(parent_gen) if parent_gen else None
    plan = store.plan(man, store.next_generation(parent_gen), fresh=(shards, 10_000, 0.01))
    _fill(store, plan, keys)
    return store.publish(plan, parent_gen, 10_000, 0.01, {"input": "x"})


def test_fresh_store_publish_and_read_back(tmp_path):
    store = BloomStore(str(tmp_path / "seen"), "pair")
    assert store.current_generation() is None
    man = _publish_run(store, [f"k{i}" for i in range(300)])
    assert man.generation == 1 and store.current_generation() == 1
    assert all(_contains(store, [f"k{i}" for i in range(300)]))
    summary = man.summary()
    assert summary["keys"] == 300 and 0 < summary["fill_ratio"] < 0.05
    pointer = json.loads((tmp_path / "seen" / CURRENT).read_text())
    assert pointer["generation"] == 1 and pointer["manifest"] == "gen-000001/manifest.json"


def test_untouched_shards_are_inherited_and_old_generations_stay_readable(tmp_path):
    store = BloomStore(str(tmp_path / "seen"), "pair")
    first = [f"a{i}" for i in range(200)]
    _publish_run(store, first)
    # the second run only touches the shard of one key
    man1 = store.manifest(1)
    plan = store.plan(man1, store.next_generation(1))
    _fill(store, plan, ["only-one-key"])
    man2 = store.publish(plan, 1, 10_000, 0.01)
    touched = int(bloom.shard_of(bloom.digests(["only-one-key"]), 4)[0])
    for shard, entry in enumerate(man2.shards):
        expected = shard_file(2 if shard == touched else 1, shard)
        assert entry["path"] == expected
    assert all(_contains(store, first + ["only-one-key"]))
    store.verify(store.manifest(1), full=True)  # generation 1 intact
    assert man2.summary()["keys"] == 201


def test_dead_run_leaves_the_previous_generation_current(tmp_path):
    store = BloomStore(str(tmp_path / "seen"), "pair")
    _publish_run(store, ["old-1", "old-2"])
    # a run that wrote its shards and died before publish
    plan = store.plan(store.manifest(1), store.next_generation(1))
    _fill(store, plan, [f"new{i}" for i in range(100)])
    assert store.current_generation() == 1
    assert _contains(store, ["old-1", "old-2"]) == [True, True]
    assert sum(_contains(store, [f"new{i}" for i in range(100)])) < 10  # only FPs, new keys unpublished
    # the next run never reuses the dead run's folder
    assert store.next_generation(1) == 3


def test_damage_is_reported_not_emptied(tmp_path):
    root = tmp_path / "seen"
    store = BloomStore(str(root), "pair")
    _publish_run(store, [f"k{i}" for i in range(100)])
    man = store.manifest(1)
    # wrong kind of filter
    with pytest.raises(bloom.CorruptFilterError, match="'pair' filter, expected a 'url'"):
        BloomStore(str(root), "url").manifest(1)
    # a shard file deleted
    victim = next(e for e in man.shards if e)["path"]
    data = (root / victim).read_bytes()
    (root / victim).unlink()
    with pytest.raises(bloom.CorruptFilterError, match="missing"):
        store.verify(man)
    # a flipped payload byte passes the cheap check (same size and header) but not the full one
    (root / victim).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    store.verify(man)
    with pytest.raises(bloom.CorruptFilterError, match="payload checksum"):
        store.verify(man, full=True)
    # CURRENT garbled, then lost while generations exist
    (root / CURRENT).write_text("{not json")
    with pytest.raises(bloom.CorruptFilterError, match="not valid JSON"):
        store.current_generation()
    (root / CURRENT).unlink()
    with pytest.raises(bloom.CorruptFilterError, match="pointer was lost"):
        store.current_generation()
    # a manifest deleted
    (root / CURRENT).write_text(json.dumps({"format": "clipcrawl-bloom-store", "generation": 1}))
    (root / "gen-000001" / "manifest.json").unlink()
    with pytest.raises(bloom.CorruptFilterError, match="missing"):
        store.manifest(1)


@pytest.fixture
def s3_store(moto_s3):
    moto_s3.bucket("filters")
    return "s3://filters/seen", moto_s3.options

def test_store_on_s3(s3_store):
    uri, options = s3_store
    store = BloomStore(uri, "pair", options)
    assert store.current_generation() is None
    keys = [f"s3key{i}" for i in range(500)]
    _publish_run(store, keys)
    _publish_run(store, ["later"], parent_gen=1)
    assert store.current_generation() == 2 and store.generations_on_disk() == [1, 2]
    assert all(_contains(store, keys + ["later"]))
    store.verify(store.manifest(2), full=True)
    assert fsio.exists(uri + "/gen-000001/manifest.json", options)
