"""A vectorised (numpy) Bloom filter with a versioned, checksummed file format.

Why our own: PySpark has no Bloom functions usable from Python tasks, and the filter must be a
plain file that any task can load through fsspec, one shard at a time. The whole filter is a
numpy byte array; membership tests and inserts work on arrays of key digests, never key by key.

Hashing. A key is a UTF-8 string. Its digest words depend on the filter's hash scheme (stored in
every file header and in the store's manifest, so a filter is always probed the way it was built):
- scheme 1 (SHA-256): SHA-256 of the key's bytes, read as four big-endian uint64 words w0..w3 (Spark's
  `sha2(col, 256)` in the JVM). w0 gives the shard, w1 and w2 the bit positions.
- scheme 2 (two XXH64, the default for new filters): words a = XXH64(key, seed 42) and
  b = XXH64(key, seed XXH64_SEED_B), exactly Spark's `xxhash64(key)` and `xxhash64(lit(1), key)`
  (Spark chains column hashes: the second is XXH64 of the key seeded with XXH64 of int32 1). About
  4x cheaper than SHA-256 in the JVM. a gives the shard, b and a the bit positions.
  Why 128 bits is enough: exact dedup and the filter treat equal digests as equal keys, so a
  collision of two different keys drops one pair. For n random keys P(any collision) <= n^2 / 2^129:
  at LAION-5B scale (5e10 candidate keys) 2.5e21 / 6.8e38 = 4e-18. XXH64 is not collision-resistant
  against someone crafting keys; the harm of a crafted collision is one pair dropped.
In both: the shard is `(w0 >> 32) % shard_count` (`shard_of`), so the bits inside a shard are
independent of how keys were assigned to shards; bit i of a key is `(h1 + i * (h2 | 1)) mod m`
(Kirsch-Mitzenmacher double hashing) in wrapping uint64 arithmetic, h1, h2 = w1, w2 (scheme 1) or
b, a (scheme 2).

File format, version 1 (little-endian; every number checked on load):

    offset size  field
    0      8     magic  b"CCBLOOM\\0"
    8      2     format version (1)
    10     2     header length in bytes (64)
    12     4     hash scheme (1 = SHA-256 words, 2 = two XXH64; see Hashing)
    16     8     m: number of bits (a multiple of 8)
    24     4     k: number of hash functions
    28     4     shard index
    32     4     shard count
    36     4     CRC-32 of the payload (zlib.crc32)
    40     8     keys added (inserts of keys that were not already all-set; an estimate of n)
    48     8     bits set (popcount of the payload)
    56     4     reserved (0)
    60     4     CRC-32 of header bytes 0..59
    64     m/8   payload: the bit array, bit j is (payload[j >> 3] >> (j & 7)) & 1

A file whose length, magic, version, header CRC or payload CRC does not match raises
`CorruptFilterError` naming the file: a damaged filter never loads as an empty one.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from typing import Iterable, Sequence

import numpy as np

MAGIC = b"CCBLOOM\0"
FORMAT_VERSION = 1
HASH_SCHEME_SHA256_DOUBLE = 1
HASH_SCHEME_XXH64_PAIR = 2
# words per digest of each scheme
HASH_SCHEME_WORDS = {HASH_SCHEME_SHA256_DOUBLE: 4, HASH_SCHEME_XXH64_PAIR: 2}
XXH64_SEED_A = 42  # Spark's xxhash64 seed
HEADER = struct.Struct("<8sHHIQIIIIQQI")  # everything before the header CRC
HEADER_SIZE = HEADER.size + 4
assert HEADER_SIZE == 64
# Rows per vectorised step: bounds the temporary (rows x k) uint64 position matrix to a few MB.
CHUNK_ROWS = 1 << 16
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class CorruptFilterError(ValueError):
    """A filter file that cannot be trusted: truncated, wrong magic/version, bad checksum."""


def optimal_parameters(expected_keys: int, false_positive_rate: float) -> tuple[int, int]:
    """(m bits, k hashes) for n keys at false-positive rate p: m = -n ln p / ln(2)^2,
    k = round(m/n ln 2). m is rounded up to a multiple of 64 so the payload is whole words."""
    if not 0 < false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    n = max(int(expected_keys), 1)
    m = math.ceil(-n * math.log(false_positive_rate) / (math.log(2) ** 2))
    m = max(64, (m + 63) // 64 * 64)
    k = max(1, round(m / n * math.log(2)))
    return m, k


_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5, _M64 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5, (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _xxh_round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` as an unsigned int (the reference algorithm, as Spark's XXH64 computes it).
    Pure Python: for keys hashed outside Spark (tests, small tools), not for bulk work."""
    n, i, seed = len(data), 0, seed & _M64
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64]
        while i + 32 <= n:
            lanes = struct.unpack_from("<4Q", data, i)
            v = [_xxh_round(acc, lane) for acc, lane in zip(v, lanes)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for acc in v:
            h = (((h ^ _xxh_round(0, acc)) * _P1) + _P4) & _M64
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h ^= _xxh_round(0, struct.unpack_from("<Q", data, i)[0])
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h ^= (struct.unpack_from("<I", data, i)[0] * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        i += 1
    h = ((h ^ (h >> 33)) * _P2) & _M64
    h = ((h ^ (h >> 29)) * _P3) & _M64
    return h ^ (h >> 32)


# Spark's xxhash64(lit(1), key): the key hashed with the seed XXH64(int32 1 little-endian, 42).
XXH64_SEED_B = xxh64(struct.pack("<i", 1), XXH64_SEED_A)


def digests(keys: Iterable[str], scheme: int = HASH_SCHEME_SHA256_DOUBLE) -> np.ndarray:
    """Digest words of each key's UTF-8 bytes: (n, 4) SHA-256 words (scheme 1, Spark's
    sha2(key, 256)) or (n, 2) words a, b (scheme 2, Spark's xxhash64(key), xxhash64(lit(1), key))."""
    raw = [k.encode("utf-8", "surrogatepass") for k in keys]
    if scheme == HASH_SCHEME_XXH64_PAIR:
        out = np.array([(xxh64(r, XXH64_SEED_A), xxh64(r, XXH64_SEED_B)) for r in raw], dtype=np.uint64)
        return out.reshape(-1, 2)
    if scheme != HASH_SCHEME_SHA256_DOUBLE:
        raise ValueError(f"unknown hash scheme {scheme}")
    return digests_from_bytes(b"".join(hashlib.sha256(r).digest() for r in raw))


def digests_from_longs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 2) uint64 words of scheme 2 from Spark's two signed xxhash64 longs (same bits)."""
    return np.stack([np.asarray(a, dtype=np.int64).view(np.uint64),
                     np.asarray(b, dtype=np.int64).view(np.uint64)], axis=1)


def digests_from_bytes(raw: bytes | memoryview | np.ndarray) -> np.ndarray:
    """View concatenated 32-byte SHA-256 digests as (n, 4) uint64 words (big-endian words)."""
    arr = np.frombuffer(raw, dtype=">u8") if not isinstance(raw, np.ndarray) else raw.view(">u8")
    if arr.size % 4:
        raise ValueError("digest bytes are not a multiple of 32")
    return arr.reshape(-1, 4).astype(np.uint64)


def shard_of(digest_words: np.ndarray, shard_count: int) -> np.ndarray:
    """Shard of each digest: the top 32 bits of w0 modulo the shard count. The Spark stage computes
    the same number as pmod(conv(substring(sha2(key, 256), 1, 8), 16, 10), shards)."""
    return ((digest_words[:, 0] >> np.uint64(32)) % np.uint64(shard_count)).astype(np.int64)


class BloomFilter:
    """A Bloom filter of m bits and k hashes over key digests of one hash scheme (see the module doc)."""

    def __init__(self, num_bits: int, num_hashes: int, payload: np.ndarray | None = None,
                 keys_added: int = 0, shard_index: int = 0, shard_count: int = 1,
                 hash_scheme: int = HASH_SCHEME_SHA256_DOUBLE):
        if num_bits <= 0 or num_bits % 8:
            raise ValueError(f"num_bits must be a positive multiple of 8, got {num_bits}")
        if num_hashes <= 0:
            raise ValueError(f"num_hashes must be positive, got {num_hashes}")
        self.num_bits = int(num_bits)
        self.num_hashes = int(num_hashes)
        if hash_scheme not in HASH_SCHEME_WORDS:
            raise ValueError(f"unknown hash scheme {hash_scheme}")
        self.hash_scheme = int(hash_scheme)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.keys_added = int(keys_added)
        if payload is None:
            payload = np.zeros(self.num_bits // 8, dtype=np.uint8)
        elif payload.dtype != np.uint8 or payload.size != self.num_bits // 8:
            raise ValueError("payload must be uint8 of num_bits/8 bytes")
        self.bits = payload

    @classmethod
    def for_capacity(cls, expected_keys: int, false_positive_rate: float, **kwargs) -> "BloomFilter":
        m, k = optimal_parameters(expected_keys, false_positive_rate)
        return cls(m, k, **kwargs)

    def copy(self) -> "BloomFilter":
        return BloomFilter(self.num_bits, self.num_hashes, self.bits.copy(), self.keys_added,
                           self.shard_index, self.shard_count, self.hash_scheme)

    # -- vectorised core -------------------------------------------------------------------------
    def _positions(self, words: np.ndarray) -> np.ndarray:
        """(rows, k) bit positions for a chunk of digests."""
        if words.ndim != 2 or words.shape[1] != HASH_SCHEME_WORDS[self.hash_scheme]:
            raise ValueError(f"digests of shape {words.shape} do not fit hash scheme {self.hash_scheme} "
                             f"({HASH_SCHEME_WORDS[self.hash_scheme]} words per key)")
        if self.hash_scheme == HASH_SCHEME_XXH64_PAIR:
            h1, h2 = words[:, 1][:, None], (words[:, 0] | np.uint64(1))[:, None]
        else:
            h1, h2 = words[:, 1][:, None], (words[:, 2] | np.uint64(1))[:, None]
        i = np.arange(self.num_hashes, dtype=np.uint64)[None, :]
        with np.errstate(over="ignore"):
            return (h1 + i * h2) % np.uint64(self.num_bits)

    def contains_digests(self, words: np.ndarray) -> np.ndarray:
        """Boolean array: True where the key is probably in the filter (never False for a member)."""
        out = np.empty(len(words), dtype=bool)
        for start in range(0, len(words), CHUNK_ROWS):
            pos = self._positions(words[start:start + CHUNK_ROWS])
            bytes_ = self.bits[(pos >> np.uint64(3)).astype(np.intp)]
            hit = (bytes_ >> (pos & np.uint64(7)).astype(np.uint8)) & np.uint8(1)
            out[start:start + CHUNK_ROWS] = hit.all(axis=1)
        return out

    def add_digests(self, words: np.ndarray) -> int:
        """Insert the digests; returns how many were new (not already all-set before this call)."""
        if not self.bits.flags.writeable:  # numpy 1.26's ufunc.at would write through anyway
            raise ValueError("this filter is read-only (loaded with writable=False): copy() it first")
        new = 0
        for start in range(0, len(words), CHUNK_ROWS):
            chunk = words[start:start + CHUNK_ROWS]
            new += int((~self.contains_digests(chunk)).sum())
            pos = self._positions(chunk).ravel()
            masks = (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)).astype(np.uint8)
            np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.intp), masks)
        self.keys_added += new
        return new

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        return self.contains_digests(digests(keys, self.hash_scheme))

    def add(self, keys: Sequence[str]) -> int:
        return self.add_digests(digests(keys, self.hash_scheme))

    def __contains__(self, key: str) -> bool:
        return bool(self.contains([key])[0])

    # -- statistics ------------------------------------------------------------------------------
    def bits_set(self) -> int:
        """Popcount of the payload, in 1 MB chunks so a large shard needs no 8x temporary."""
        total = 0
        for start in range(0, self.bits.size, 1 << 20):
            total += int(_POPCOUNT[self.bits[start:start + (1 << 20)]].sum(dtype=np.int64))
        return total

    def fill_ratio(self) -> float:
        return self.bits_set() / self.num_bits

    def estimated_false_positive_rate(self) -> float:
        """P(all k bits of a non-member are set) = fill^k, from the actual fill of the bit array."""
        return self.fill_ratio() ** self.num_hashes

    # -- serialisation ---------------------------------------------------------------------------
    def to_bytes(self) -> bytearray:
        """The file image, built in one buffer (one copy of the payload, not three)."""
        payload = memoryview(self.bits)
        head = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, self.hash_scheme,
                           self.num_bits, self.num_hashes, self.shard_index, self.shard_count,
                           zlib.crc32(payload), self.keys_added, self.bits_set(), 0)
        out = bytearray(HEADER_SIZE + self.bits.size)
        out[:HEADER.size] = head
        out[HEADER.size:HEADER_SIZE] = struct.pack("<I", zlib.crc32(head))
        np.frombuffer(out, dtype=np.uint8, offset=HEADER_SIZE)[:] = self.bits  # memcpy, no temporary
        return out

    @staticmethod
    def read_header(data: bytes, source: str = "<bytes>") -> dict:
        """Parse and check the 64-byte header (no payload needed): cheap checks on the driver."""
        if len(data) < HEADER_SIZE:
            raise CorruptFilterError(f"{source}: {len(data)} bytes, shorter than the "
                                     f"{HEADER_SIZE}-byte Bloom filter header")
        head = bytes(data[:HEADER.size])
        (crc_head,) = struct.unpack("<I", bytes(data[HEADER.size:HEADER_SIZE]))
        fields = HEADER.unpack(head)
        if fields[0] != MAGIC:
            raise CorruptFilterError(f"{source}: not a clipcrawl Bloom filter (bad magic)")
        if zlib.crc32(head) != crc_head:
            raise CorruptFilterError(f"{source}: header checksum mismatch")
        if fields[1] != FORMAT_VERSION:
            raise CorruptFilterError(f"{source}: format version {fields[1]} is not supported "
                                     f"(this code reads version {FORMAT_VERSION})")
        if fields[2] != HEADER_SIZE or fields[3] not in HASH_SCHEME_WORDS:
            raise CorruptFilterError(f"{source}: unknown header size {fields[2]} or hash scheme {fields[3]}")
        header = dict(zip(("magic", "version", "header_size", "hash_scheme", "num_bits", "num_hashes",
                           "shard_index", "shard_count", "payload_crc32", "keys_added", "bits_set",
                           "reserved"), fields))
        header["file_bytes"] = HEADER_SIZE + header["num_bits"] // 8
        return header

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", writable: bool = True) -> "BloomFilter":
        """Parse a file image. `writable=False` keeps a read-only view of `data` instead of a
        copy: a task that only tests membership (or copies before adding) saves one shard of RAM."""
        header = cls.read_header(data, source)
        if len(data) != header["file_bytes"]:
            raise CorruptFilterError(f"{source}: {len(data)} bytes, expected {header['file_bytes']} "
                                     f"(truncated or padded)")
        payload = memoryview(data)[HEADER_SIZE:]
        if zlib.crc32(payload) != header["payload_crc32"]:
            raise CorruptFilterError(f"{source}: payload checksum mismatch (the file is damaged)")
        bits = np.frombuffer(payload, dtype=np.uint8)
        bits = bits.copy() if writable else bits
        return cls(header["num_bits"], header["num_hashes"], bits, header["keys_added"],
                   header["shard_index"], header["shard_count"], header["hash_scheme"])

    def save(self, uri: str, storage_options: dict | None = None) -> None:
        from udfs import fsio
        fsio.write_bytes_atomic(uri, self.to_bytes(), storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None, writable: bool = True) -> "BloomFilter":
        from udfs import fsio
        try:
            with fsio.open_uri(uri, "rb", storage_options) as fh:
                data = fh.read()
        except FileNotFoundError as exc:
            raise CorruptFilterError(f"{uri}: Bloom filter file is missing") from exc
        return cls.from_bytes(data, uri, writable)
