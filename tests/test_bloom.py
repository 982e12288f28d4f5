"""Unit tests of udfs/dedup/bloom.py: no false negatives, FP rate vs configured, file format, corruption."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest

from udfs.dedup import bloom
from udfs.dedup.bloom import BloomFilter, CorruptFilterError


def test_parameters_follow_the_textbook_formulas():
    for n, p in [(1_000_000, 0.01), (1000, 0.001), (10, 0.1)]:
        m, k = bloom.optimal_parameters(n, p)
        exact = -n * math.log(p) / math.log(2) ** 2
        assert m % 64 == 0 and exact <= m < exact + 64 + 1
        assert k == max(1, round(m / n * math.log(2)))
    with pytest.raises(ValueError):
        bloom.optimal_parameters(10, 1.5)


def test_digests_are_sha256_words_and_shards_cover_the_range():
    keys = ["a", "http://x/y.jpg\talt", "ünïcode"]
    words = bloom.digests(keys)
    for key, row in zip(keys, words):
        assert b"".join(int(w).to_bytes(8, "big") for w in row) == hashlib.sha256(key.encode()).digest()
    shards = bloom.shard_of(bloom.digests([str(i) for i in range(20000)]), 7)
    counts = np.bincount(shards, minlength=7)
    assert shards.min() == 0 and shards.max() == 6
    assert counts.min() > 20000 / 7 * 0.9  # roughly uniform


def test_no_false_negatives_ever():
    bf = BloomFilter.for_capacity(50_000, 0.01)
    keys = [f"https://img.example/{i}.jpg\tcaption {i}" for i in range(60_000)]  # over capacity too
    bf.add(keys[:30_000])
    assert bf.contains(keys[:30_000]).all()
    bf.add(keys[30_000:])
    assert bf.contains(keys).all()
    assert all(k in bf for k in keys[:100])
    restored = BloomFilter.from_bytes(bf.to_bytes())
    assert restored.contains(keys).all()


def test_measured_false_positive_rate_on_1m_keys_within_1_5x_of_configured():
    p = 0.01
    bf = BloomFilter.for_capacity(1_000_000, p)
    members = bloom.digests(f"member-{i}" for i in range(1_000_000))
    assert bf.add_digests(members) > 990_000
    assert bf.contains_digests(members).all()
    strangers = bloom.digests(f"stranger-{i}" for i in range(1_000_000))
    measured = bf.contains_digests(strangers).mean()
    assert p / 1.5 <= measured <= p * 1.5, measured
    # the estimate from the fill ratio agrees with the measurement
    assert abs(bf.estimated_false_positive_rate() - measured) < 0.2 * p
    assert 0.45 < bf.fill_ratio() < 0.55  # an optimally sized filter is about half full


def test_add_reports_new_keys_and_copy_is_independent():
    bf = BloomFilter.for_capacity(1000, 0.01)
    assert bf.add(["a", "b"]) == 2
    assert bf.add(["a", "c"]) == 1
    assert bf.keys_added == 3
    twin = bf.copy()
    twin.add(["d"])
    assert "d" in twin and not bf.contains(["d"])[0]


def test_serialisation_round_trip(tmp_path):
    bf = BloomFilter.for_capacity(5000, 0.02, shard_index=3, shard_count=8)
    bf.add([f"k{i}" for i in range(4000)])
    data = bf.to_bytes()
    assert data[:8] == bloom.MAGIC and len(data) == bloom.HEADER_SIZE + bf.num_bits // 8
    header = BloomFilter.read_header(data)
    assert (header["num_bits"], header["num_hashes"], header["shard_index"], header["shard_count"],
            header["keys_added"], header["bits_set"]) == (bf.num_bits, bf.num_hashes, 3, 8, 4000, bf.bits_set())
    again = BloomFilter.from_bytes(data)
    assert again.to_bytes() == data
    bf.save(str(tmp_path / "f" / "x.bloom"))
    loaded = BloomFilter.load(str(tmp_path / "f" / "x.bloom"))
    assert np.array_equal(loaded.bits, bf.bits) and loaded.keys_added == 4000
    assert not list((tmp_path / "f").glob("*.tmp"))  # atomic write left no temporary
    view = BloomFilter.from_bytes(bytes(data), writable=False)  # no copy of the payload
    assert view.contains([f"k{i}" for i in range(4000)]).all()
    with pytest.raises(ValueError, match="read-only"):
        view.add(["new"])


def _corrupt(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:]


@pytest.mark.parametrize("damage, message", [
    (lambda d: _corrupt(d, bloom.HEADER_SIZE + 17), "payload checksum"),
    (lambda d: _corrupt(d, 20), "header checksum"),
    (lambda d: b"NOTBLOOM" + d[8:], "bad magic"),
    (lambda d: d[:-5], "truncated"),
    (lambda d: d[:40], "shorter than"),
    (lambda d: d + b"\0", "truncated or padded"),
])
def test_corruption_is_detected(damage, message):
    bf = BloomFilter.for_capacity(2000, 0.01)
    bf.add([str(i) for i in range(500)])
    with pytest.raises(CorruptFilterError, match=message):
        BloomFilter.from_bytes(damage(bf.to_bytes()), "x.bloom")


def test_unknown_format_version_is_refused():
    data = bytearray(BloomFilter.for_capacity(100, 0.01).to_bytes())
    data[8:10] = struct.pack("<H", 2)
    head = bytes(data[:bloom.HEADER.size])
    data[bloom.HEADER.size:bloom.HEADER_SIZE] = struct.pack("<I", __import__("zlib").crc32(head))
    with pytest.raises(CorruptFilterError, match="version 2 is not supported"):
        BloomFilter.from_bytes(bytes(data))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorruptFilterError, match="missing"):
        BloomFilter.load(str(tmp_path / "nope.bloom"))
