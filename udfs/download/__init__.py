"""Download: fetch one image per pair safely and politely, resize it, and write tar shards.
Fetching behind the address guard, per-host slots, robots/opt-out consent, resizing, shard files.
"""
