"""Stable identifiers of an image-text pair.

`uid` is the first 8 bytes of BLAKE2b over `url + "\\t" + text` (UTF-8), as 16 hex characters.
The same pair gets the same uid in every run and on every machine, which is what lets reruns,
retries and joins between subsets line up. `SAMPLE_ID` / `hash` in the final subsets are the
same 8 bytes read as a signed 64-bit integer (parquet has no unsigned 64-bit type).
"""

from __future__ import annotations

import hashlib


def pair_uid(url: str, text: str) -> str:
    return hashlib.blake2b(f"{url}\t{text}".encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def uid_to_int64(uid: str) -> int:
    return int.from_bytes(bytes.fromhex(uid), "big", signed=True)
