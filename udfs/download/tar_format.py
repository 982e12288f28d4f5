"""USTAR member headers built from constants, for the webdataset tars written here.

tarfile builds each header field by field in Python (TarInfo.tobuf, then a checksum over the
block): writing a shard of small images through it was a quarter of a download worker's
GIL-holding time (py-spy --gil, 2,000 images, one process). The bytes here are the ones tarfile
writes for the same member (a regular file, uid/gid 0, no owner names), which
tests/test_tar_format.py checks against tarfile itself; names over 100 bytes and sizes past the
octal field go through tarfile.
"""

from __future__ import annotations

import functools
import tarfile

BLOCK = tarfile.BLOCKSIZE     # 512
RECORD = tarfile.RECORDSIZE   # 20 blocks: tarfile pads the archive to a whole record


@functools.lru_cache(maxsize=16)
def _constants(mode: int, mtime: int) -> tuple[bytes, bytes, bytes, int]:
    """The fixed parts of a header around the name and size fields, and their byte sum."""
    middle = b"%07o\0" % mode + b"0000000\0" * 2                 # mode, uid, gid
    after_size = b"%011o\0" % mtime + b" " * 8                    # mtime, checksum placeholder
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    return middle, after_size, tail, sum(middle) + sum(after_size) + sum(tail)


def ustar_header(name: str, size: int, mtime: int = 0, mode: int = 0o644) -> bytes:
    """The 512-byte header of a regular file member, as tarfile writes it in USTAR format."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11 or not 0 <= mtime < 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, mode
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    middle, after_size, tail, fixed_sum = _constants(mode, mtime)
    size_field = b"%011o\0" % size
    checksum = fixed_sum + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), middle, size_field, after_size[:12], b"%06o\0 " % checksum, tail))


def padding(size: int) -> bytes:
    """NUL bytes from the end of a member's data to its next block."""
    return b"\0" * (-size % BLOCK)


def member_parts(name: str, data: bytes, mtime: int = 0, mode: int = 0o644) -> tuple[bytes, bytes, bytes]:
    """Header, data and padding of one member, apart: a writer joins many at once, and the
    header's length gives where the data starts."""
    return ustar_header(name, len(data), mtime, mode), data, padding(len(data))


def member(name: str, data: bytes, mtime: int = 0, mode: int = 0o644) -> bytes:
    """Header, data and padding of one member."""
    return b"".join(member_parts(name, data, mtime, mode))


def end_of_archive(offset: int) -> bytes:
    """What tarfile writes on close after `offset` bytes of members: two zero blocks, then NULs
    to the end of the record."""
    end = offset + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end % RECORD))
