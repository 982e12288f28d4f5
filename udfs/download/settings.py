"""The download section of the config, checked before any task starts (a bad value fails the run
with one line instead of failing every shard)."""

from __future__ import annotations

from udfs import fsio
from udfs.download.address_guard import parse_cidrs
from udfs.download.resize import ResizeConfig
from udfs.download.robots import ConsentConfig


def check_section(section: dict, storage_options: dict | None = None) -> None:
    """Bad download.* values as ValueError (the stage reports them as ConfigError)."""
    ResizeConfig.from_section(section)
    parse_cidrs(section.get("allowed_cidrs"))
    ConsentConfig.from_section(section)
    for key in ("shard_size", "thread_count"):
        if not isinstance(section.get(key), int) or section[key] < 1:
            raise ValueError(f"download.{key} must be a positive integer, got {section.get(key)!r}")
    if not isinstance(section.get("blocked_phash_distance", 4), int) or not 0 <= section.get("blocked_phash_distance", 4) <= 32:
        raise ValueError(f"download.blocked_phash_distance must be an integer 0..32, "
                          f"got {section.get('blocked_phash_distance')!r}")
    for key in ("per_host_concurrency", "dns_cache_hosts", "decode_concurrency"):
        if not isinstance(section.get(key, 0), int) or section.get(key, 0) < 0:
            raise ValueError(f"download.{key} must be an integer >= 0, got {section.get(key)!r}")
    for key in ("keep_alive_idle_seconds", "dns_cache_seconds", "dns_negative_cache_seconds"):
        if not isinstance(section.get(key, 0), (int, float)) or section.get(key, 0) < 0:
            raise ValueError(f"download.{key} must be a number >= 0, got {section.get(key)!r}")
    for key in ("opt_out_list", "blocked_sha256", "blocked_phash"):
        if section.get(key) and not fsio.exists(section[key], storage_options):
            raise ValueError(f"download.{key}: {section[key]} not found")
