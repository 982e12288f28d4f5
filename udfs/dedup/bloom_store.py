"""A sharded, generation-numbered store of Bloom filters on fsspec (local path or s3://).

Why sharded: 10B keys at 1% false positives is ~12 GB of bits, more than one executor should
hold. Keys are split by the top bits of their digest (`bloom.shard_of`) into
`shard_count` independent filters, each sized for `expected_keys / shard_count` keys, so a Spark
task loads only the shard(s) of the rows it was given.

Why generations: a run reads generation N and writes N+1 into a new folder; readers follow the
`CURRENT` pointer, which is replaced (one atomic object write) only after the run's data output is
written. A run that dies at any point before that leaves `CURRENT`, and everything it points to,
untouched. Files of an unpublished generation are never read.

Hash scheme: every manifest and shard header names how keys become bit positions
(`bloom.HASH_SCHEME_*`). A store keeps the scheme it was created with for all its generations;
its readers must hash keys the same way (`ShardPlan.hash_scheme`); a shard of another scheme is
refused as damaged, never probed.

Layout under the store root:

    CURRENT                       {"format": "clipcrawl-bloom-store", "generation": N,
                                   "manifest": "gen-00000N/manifest.json"}
    gen-00000N/manifest.json      parameters + one entry per shard (see `Manifest`)
    gen-00000N/shard-00007.bloom  a `bloom.BloomFilter` file (header + CRC-checked payload)

A shard that received no keys in a run is not rewritten: the new manifest points at the file of
the generation that last wrote it (paths are relative to the root), so old generations stay
readable and a small run does not rewrite a large filter. Old generations are not deleted here.

One writer at a time per store: two concurrent runs on the same store would both publish N+1.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from udfs import fsio
from udfs.dedup.bloom import (
    HASH_SCHEME_SHA256_DOUBLE,
    HASH_SCHEME_WORDS,
    BloomFilter,
    CorruptFilterError,
    optimal_parameters,
)

log = logging.getLogger(__name__)

STORE_FORMAT = "clipcrawl-bloom-store"
STORE_FORMAT_VERSION = 1
# A manifest of another hash scheme than SHA-256 says version 2, so code that predates hash
# schemes refuses it (it would otherwise fill the store's empty shards with SHA-256 positions).
STORE_FORMAT_VERSION_SCHEMES = 2
CURRENT = "CURRENT"
_GEN_RE = re.compile(r"gen-(\d{6,})$")


def generation_dir(generation: int) -> str:
    return f"gen-{generation:06d}"


def shard_file(generation: int, shard: int) -> str:
    return f"{generation_dir(generation)}/shard-{shard:05d}.bloom"


@dataclass
class Manifest:
    """The published description of one generation. `shards[i]` is None (shard still empty) or
    {"path", "bytes", "crc32", "keys", "bits_set"} of the file holding shard i."""

    generation: int
    parent: int | None
    key_kind: str
    shard_count: int
    num_bits: int           # per shard
    num_hashes: int
    expected_keys: int
    false_positive_rate: float
    shards: list[dict | None]
    created_at: str = ""
    run: dict | None = None
    hash_scheme: int = HASH_SCHEME_SHA256_DOUBLE   # bloom.HASH_SCHEME_*: how keys become bit positions

    def to_json(self) -> dict:
        version = STORE_FORMAT_VERSION if self.hash_scheme == HASH_SCHEME_SHA256_DOUBLE \
            else STORE_FORMAT_VERSION_SCHEMES
        return {"format": STORE_FORMAT, "format_version": version, "hash_scheme": self.hash_scheme,
                "generation": self.generation, "parent": self.parent, "key_kind": self.key_kind,
                "shard_count": self.shard_count, "num_bits": self.num_bits,
                "num_hashes": self.num_hashes, "expected_keys": self.expected_keys,
                "false_positive_rate": self.false_positive_rate, "created_at": self.created_at,
                "run": self.run or {}, "summary": self.summary(), "shards": self.shards}

    @classmethod
    def from_json(cls, obj: Any, source: str) -> "Manifest":
        try:
            if obj.get("format") != STORE_FORMAT or obj.get("format_version") not in (
                    STORE_FORMAT_VERSION, STORE_FORMAT_VERSION_SCHEMES):
                raise CorruptFilterError(f"{source}: not a version-{STORE_FORMAT_VERSION} or "
                                         f"-{STORE_FORMAT_VERSION_SCHEMES} {STORE_FORMAT} manifest")
            # manifests written before hash schemes existed hold SHA-256 filters
            scheme = int(obj.get("hash_scheme", HASH_SCHEME_SHA256_DOUBLE))
            if scheme not in HASH_SCHEME_WORDS:
                raise CorruptFilterError(f"{source}: unknown hash scheme {scheme}")
            shards = obj["shards"]
            if not isinstance(shards, list) or len(shards) != int(obj["shard_count"]):
                raise CorruptFilterError(f"{source}: shard list does not match shard_count")
            return cls(int(obj["generation"]), obj.get("parent"), str(obj["key_kind"]),
                       int(obj["shard_count"]), int(obj["num_bits"]), int(obj["num_hashes"]),
                       int(obj["expected_keys"]), float(obj["false_positive_rate"]), shards,
                       obj.get("created_at", ""), obj.get("run"), scheme)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, CorruptFilterError):
                raise
            raise CorruptFilterError(f"{source}: malformed manifest ({exc!r})") from exc

    def summary(self) -> dict:
        """Keys, fill ratio and estimated false-positive rate of the whole sharded filter. A query
        for a non-member lands in one shard (uniformly), so its FP rate is the mean of fill_i^k."""
        total_bits = self.num_bits * self.shard_count
        bits_set = [int(e["bits_set"]) if e else 0 for e in self.shards]
        fpr = sum((b / self.num_bits) ** self.num_hashes for b in bits_set) / self.shard_count
        return {"keys": sum(int(e["keys"]) if e else 0 for e in self.shards),
                "bits_set": sum(bits_set), "total_bits": total_bits,
                "bytes": sum(int(e["bytes"]) if e else 0 for e in self.shards),
                "fill_ratio": sum(bits_set) / total_bits if total_bits else 0.0,
                "estimated_false_positive_rate": fpr}


@dataclass
class ShardPlan:
    """What a Spark task needs to read and (optionally) write shards: small and picklable."""

    root: str
    storage_options: dict
    key_kind: str
    shard_count: int
    num_bits: int
    num_hashes: int
    read_entries: list[dict | None]   # the manifest entries of the generation being read
    write_generation: int | None = None
    hash_scheme: int = HASH_SCHEME_SHA256_DOUBLE

    def load(self, shard: int) -> BloomFilter:
        """The shard as published (an empty filter when the shard has no file yet), read-only:
        `copy()` it before adding. The header and payload checksum are verified; a mismatch
        raises CorruptFilterError."""
        entry = self.read_entries[shard]
        if entry is None:
            return BloomFilter(self.num_bits, self.num_hashes, shard_index=shard,
                               shard_count=self.shard_count, hash_scheme=self.hash_scheme)
        uri = fsio.join(self.root, entry["path"])
        bf = BloomFilter.load(uri, self.storage_options, writable=False)
        if (bf.num_bits, bf.num_hashes, bf.shard_index, bf.shard_count, bf.hash_scheme) != (
                self.num_bits, self.num_hashes, shard, self.shard_count, self.hash_scheme):
            raise CorruptFilterError(f"{uri}: header ({bf.num_bits} bits, k={bf.num_hashes}, shard "
                                     f"{bf.shard_index}/{bf.shard_count}, hash scheme {bf.hash_scheme}) "
                                     f"does not match the manifest (hash scheme {self.hash_scheme})")
        return bf

    def write(self, bf: BloomFilter) -> str:
        if self.write_generation is None:
            raise RuntimeError("this plan is read-only")
        uri = fsio.join(self.root, shard_file(self.write_generation, bf.shard_index))
        bf.save(uri, self.storage_options)
        return uri


class BloomStore:
    """The filter store at `root`; see the module doc for the layout and guarantees."""

    def __init__(self, root: str, key_kind: str, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        self.key_kind = key_kind
        self.storage_options = storage_options or {}

    def _uri(self, rel: str) -> str:
        return fsio.join(self.root, rel)

    def _read_json(self, rel: str) -> Any:
        uri = self._uri(rel)
        try:
            return fsio.read_json(uri, self.storage_options)
        except FileNotFoundError as exc:
            raise CorruptFilterError(f"{uri} is missing") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptFilterError(f"{uri} is not valid JSON ({exc})") from exc

    def generations_on_disk(self) -> list[int]:
        """Generation folders present, published or not."""
        if not fsio.exists(self.root, self.storage_options):
            return []
        fs, path = fsio.filesystem(self.root, self.storage_options)
        found = []
        for entry in fs.ls(path, detail=False):
            m = _GEN_RE.search(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def current_generation(self) -> int | None:
        """The published generation, or None for a store that was never published.

        A root without CURRENT is a fresh store only if no generation folder holds a manifest;
        otherwise CURRENT was lost and the store is reported corrupt (not silently emptied)."""
        if not fsio.exists(self._uri(CURRENT), self.storage_options):
            orphans = [g for g in self.generations_on_disk()
                       if fsio.exists(self._uri(f"{generation_dir(g)}/manifest.json"), self.storage_options)]
            if orphans:
                raise CorruptFilterError(f"{self._uri(CURRENT)} is missing but generations "
                                         f"{orphans} have manifests: the filter pointer was lost")
            return None
        pointer = self._read_json(CURRENT)
        if not isinstance(pointer, dict) or pointer.get("format") != STORE_FORMAT \
                or not isinstance(pointer.get("generation"), int):
            raise CorruptFilterError(f"{self._uri(CURRENT)} is not a {STORE_FORMAT} pointer")
        return pointer["generation"]

    def manifest(self, generation: int) -> Manifest:
        rel = f"{generation_dir(generation)}/manifest.json"
        man = Manifest.from_json(self._read_json(rel), self._uri(rel))
        if man.generation != generation:
            raise CorruptFilterError(f"{self._uri(rel)} says generation {man.generation}")
        if man.key_kind != self.key_kind:
            raise CorruptFilterError(f"{self.root} holds a '{man.key_kind}' filter, "
                                     f"expected a '{self.key_kind}' filter (wrong --seen/--failed-seen?)")
        return man

    def verify(self, man: Manifest, full: bool = False) -> None:
        """Check that every shard file of `man` exists with the manifest's size and header
        (cheap: one small read per shard). `full=True` also reads every payload and checks its
        CRC, which the tasks otherwise do when they load a shard."""
        fs, _ = fsio.filesystem(self.root, self.storage_options)
        reader = self.plan(man)
        for shard, entry in enumerate(man.shards):
            if entry is None:
                continue
            uri = self._uri(entry["path"])
            if full:
                reader.load(shard)  # header + payload CRC
                continue
            _, path = fsio.filesystem(uri, self.storage_options)
            try:
                size = fs.info(path)["size"]
                with fs.open(path, "rb") as fh:
                    head = fh.read(64)
            except FileNotFoundError as exc:
                raise CorruptFilterError(f"{uri}: shard {shard} of generation {man.generation} "
                                         "is missing") from exc
            header = BloomFilter.read_header(head, uri)
            if size != entry["bytes"] or header["payload_crc32"] != entry["crc32"] \
                    or header["shard_index"] != shard or header["num_bits"] != man.num_bits \
                    or header["hash_scheme"] != man.hash_scheme:
                raise CorruptFilterError(f"{uri}: size/header does not match the manifest of "
                                         f"generation {man.generation}")

    def plan(self, man: Manifest | None, write_generation: int | None = None,
             fresh: tuple[int, int, float] | None = None,
             fresh_scheme: int = HASH_SCHEME_SHA256_DOUBLE) -> ShardPlan:
        """A task plan reading `man` (or an empty filter sized by `fresh` = (shards, expected_keys,
        fpr) and hashed by `fresh_scheme` when there is no manifest), writing into
        `write_generation` if given. A manifest's own hash scheme always wins: a filter is never
        probed or extended with another scheme than the one it was built with."""
        if man is not None:
            return ShardPlan(self.root, self.storage_options, self.key_kind, man.shard_count,
                             man.num_bits, man.num_hashes, list(man.shards), write_generation,
                             man.hash_scheme)
        if fresh is None:
            raise ValueError("a plan without a manifest needs fresh sizing")
        shards, expected_keys, fpr = fresh
        num_bits, num_hashes = optimal_parameters(max(1, -(-int(expected_keys) // int(shards))), fpr)
        if fresh_scheme not in HASH_SCHEME_WORDS:
            raise ValueError(f"unknown hash scheme {fresh_scheme}")
        return ShardPlan(self.root, self.storage_options, self.key_kind, int(shards), num_bits,
                         num_hashes, [None] * int(shards), write_generation, int(fresh_scheme))

    def next_generation(self, read_generation: int | None) -> int:
        """A number no folder uses yet: a dead run's unpublished folder is skipped, never reused
        or deleted (it is garbage, safe to remove by hand)."""
        on_disk = self.generations_on_disk()
        try:
            published = self.current_generation() or 0
        except CorruptFilterError:
            published = 0
        unpublished = [g for g in on_disk if g > max(read_generation or 0, published)]
        if unpublished:
            log.warning("filter store %s has unpublished generation folders %s (left by runs that "
                        "did not finish); they are ignored", self.root, unpublished)
        return max([read_generation or 0, *on_disk]) + 1

    def publish(self, plan: ShardPlan, parent: int | None, expected_keys: int,
                false_positive_rate: float, run: dict | None = None) -> Manifest:
        """Describe the shard files the tasks wrote under `plan.write_generation` (the others
        are inherited from the parent), write the manifest, then switch CURRENT to it."""
        gen = plan.write_generation
        if gen is None:
            raise ValueError("the plan has no generation to publish")
        fs, _ = fsio.filesystem(self.root, self.storage_options)
        entries: list[dict | None] = list(plan.read_entries)
        for shard in range(plan.shard_count):
            rel = shard_file(gen, shard)
            _, path = fsio.filesystem(self._uri(rel), self.storage_options)
            if not fs.exists(path):
                continue
            with fs.open(path, "rb") as fh:
                header = BloomFilter.read_header(fh.read(64), self._uri(rel))
            if header["hash_scheme"] != plan.hash_scheme:
                raise CorruptFilterError(f"{self._uri(rel)}: hash scheme {header['hash_scheme']}, the "
                                         f"generation is being written with scheme {plan.hash_scheme}")
            entries[shard] = {"path": rel, "bytes": header["file_bytes"],
                              "crc32": header["payload_crc32"], "keys": header["keys_added"],
                              "bits_set": header["bits_set"]}
        man = Manifest(gen, parent, self.key_kind, plan.shard_count, plan.num_bits, plan.num_hashes,
                       int(expected_keys), float(false_positive_rate), entries,
                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), run, plan.hash_scheme)
        manifest_rel = f"{generation_dir(gen)}/manifest.json"
        fsio.write_json(self._uri(manifest_rel), man.to_json(), self.storage_options)
        pointer = {"format": STORE_FORMAT, "generation": gen, "manifest": manifest_rel}
        fsio.write_bytes_atomic(self._uri(CURRENT), json.dumps(pointer).encode() + b"\n",
                                self.storage_options)
        log.info("filter %s: published generation %d (%s)", self.root, gen, man.summary())
        return man
