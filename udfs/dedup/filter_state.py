"""The Bloom filter stores as one dedup run sees them: which generation it reads, which it writes.

Driver side, no Spark: opening a store (damage, a fresh start, resuming after a run that died
between its publish and its stats), the figures for the stats JSON, and the publish.
"""

from __future__ import annotations

import logging
from typing import Callable

from udfs.dedup.bloom import HASH_SCHEME_XXH64_PAIR, CorruptFilterError
from udfs.dedup.bloom_store import BloomStore, Manifest, ShardPlan

log = logging.getLogger(__name__)


class FilterUnusable(ValueError):
    """A damaged or missing filter with on_corrupt_filter=error; the stage reports it as bad input."""


class FilterState:
    """One filter store as this run sees it: what it reads, and what it will write."""

    def __init__(self, role: str, uri: str, store: BloomStore, read: Manifest | None,
                 plan: ShardPlan, fresh_start_reason: str | None, resumed: bool):
        self.role, self.uri, self.store, self.read = role, uri, store, read
        self.plan, self.fresh_start_reason, self.resumed = plan, fresh_start_reason, resumed
        self.written: Manifest | None = None

    def stats(self) -> dict:
        out = {"uri": self.uri, "generation_read": self.read.generation if self.read else None,
               "generation_written": self.written.generation if self.written else None,
               "shards": self.plan.shard_count, "bits_per_shard": self.plan.num_bits,
               "hashes": self.plan.num_hashes, "hash_scheme": self.plan.hash_scheme,
               "fresh_start_reason": self.fresh_start_reason,
               "resumed_from_parent": self.resumed}
        final = self.written or self.read
        if final is not None:
            summary = final.summary()
            out.update({"keys": summary["keys"], "bytes": summary["bytes"],
                        "fill_ratio": round(summary["fill_ratio"], 6),
                        "estimated_false_positive_rate": summary["estimated_false_positive_rate"],
                        "configured_false_positive_rate": final.false_positive_rate})
        return out

    def publish(self, false_positive_rate: float, expected_keys: int, run: dict) -> None:
        """Publish the generation this run wrote (moves CURRENT); a store read keeps its own sizing."""
        self.written = self.store.publish(self.plan, self.read.generation if self.read else None,
                                          self.read.expected_keys if self.read else expected_keys,
                                          self.read.false_positive_rate if self.read
                                          else false_positive_rate, run)


def open_filter(role: str, uri: str, key_kind: str, conf: dict, storage_options: dict,
                shards: int, expected_keys: int, writable: bool,
                resume_run: dict | None = None,
                is_complete: Callable[[str, dict], bool] | None = None) -> FilterState:
    """Open a store for this run (`conf`: the dedup section, its on_corrupt_filter already checked).
    Damage raises FilterUnusable unless on_corrupt_filter=fresh_start.

    `resume_run` ({"input", "output"}): if CURRENT was published by a run with the same input
    and output whose stats were never written (`is_complete(output, storage_options)` is false:
    it died after the publish), read its parent."""
    store = BloomStore(uri, key_kind, storage_options)
    mode = conf.get("on_corrupt_filter", "error")
    fpr = float(conf["false_positive_rate"])
    fresh_scheme = int(conf.get("hash_scheme", HASH_SCHEME_XXH64_PAIR))
    read, reason, resumed = None, None, False
    try:
        gen = store.current_generation()
        if gen is not None:
            read = store.manifest(gen)
            run = read.run or {}
            if (resume_run and run.get("input") == resume_run["input"]
                    and run.get("output") == resume_run["output"]
                    and is_complete is not None
                    and not is_complete(resume_run["output"], storage_options)):
                log.warning("%s filter generation %d was published by an unfinished run with the "
                            "same input and output: reading its parent %s instead", role, gen, read.parent)
                resumed = True
                read = store.manifest(read.parent) if read.parent is not None else None
            if read is not None:
                store.verify(read, full=(mode == "fresh_start"))
    except CorruptFilterError as exc:
        if mode != "fresh_start":
            raise FilterUnusable(
                f"{role} filter at {uri} is unusable: {exc}. Restore it from a backup, point to "
                f"another filter, or set dedup.on_corrupt_filter=fresh_start to start an empty "
                f"filter (pairs it held are then kept again)") from exc
        log.error("%s filter at %s is unusable (%s): starting a fresh, empty filter "
                  "(dedup.on_corrupt_filter=fresh_start)", role, uri, exc)
        read, reason = None, str(exc)
    if read is not None and read.shard_count != shards:
        log.info("%s filter has %d shards (config says %d): the filter's own count is used",
                 role, read.shard_count, shards)
    # A number above every folder on disk: a fresh start never overwrites the damaged generations.
    write_gen = store.next_generation(read.generation if read else None) if writable else None
    plan = store.plan(read, write_gen, fresh=(shards, expected_keys, fpr), fresh_scheme=fresh_scheme)
    if read is not None and read.hash_scheme != fresh_scheme:
        log.info("%s filter at %s uses hash scheme %d (dedup.hash_scheme=%d applies to new filters "
                 "only): it is probed and extended with its own scheme", role, uri,
                 read.hash_scheme, fresh_scheme)
    return FilterState(role, uri, store, read, plan, reason, resumed)
