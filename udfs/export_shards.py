"""Training-ready shards from a subset (pure Python, no Spark): `spark_jobs/export.py` runs these
functions in its tasks, the tests and the benchmark call them directly.

Three steps, because a shuffled subset draws every output shard's samples from many source shards:
1. `index_tar` / `locate`: the member table of one download tar (name, data offset, size), read
   from the tar headers alone (a local tar is read by seeking from header to header, not through
   its data), and the rows of that tar looked up in it;
2. `place` / `shard_rows`: each row's shard without a global sort: rows are cut into buckets of
   the sort key whose counts the driver knows, a row goes to every shard its bucket overlaps, and
   the shard's task ranks the rows of those buckets (all of them, so the ranks are exact) and
   keeps its own;
3. `write_shard`: one output shard, its images copied as stored from the source tars by (offset,
   size): local files inside the kernel (copy_file_range, sources in offset order), remote ones by
   range reads a chunk at a time. The image is never re-encoded.

Output, under `<output>/`:
- webdataset: `{shard:05d}.tar` with `KEY.<ext>` (the image bytes as downloaded and resized; ext as
  in the source, jpg by default), `KEY.txt` (the caption) and `KEY.json` (the subset's LAION columns).
  The tar headers carry fixed metadata (mtime 0, uid 0), so the same export writes identical bytes.
- parquet: `{shard:05d}.parquet` with `image` = struct<bytes, path> and the LAION columns, and the
  Hugging Face `datasets` features in the schema metadata, so `load_dataset("parquet", ...)` decodes
  `image` as an Image feature.
- `_markers/{shard:05d}.json`, written last for each shard: a shard is complete when its marker
  exists with the same export plan; a resumed export skips it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import tarfile
import time
import uuid

import orjson

from udfs import fsio
from udfs.download.shard_writer import split_key, verify_size

FORMATS = ("webdataset", "parquet")
SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
MARKERS_DIR = "_markers"
# Members of a download tar that are not the image (the caption and the download record).
SIDECAR_EXTS = ("txt", "json")
# The subset's LAION columns, as written to KEY.json and to the parquet shards (tar_path, the source
# shard's URI, stays in the manifest: it means nothing once the shards are copied elsewhere).
LAION_COLUMNS = ("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "similarity", "LANGUAGE", "punsafe",
                 "pwatermark", "hash", "key")
# Arrow type names of LAION_COLUMNS (the SUBSET schema in spark_jobs/schemas.py).
COLUMN_TYPES = {"SAMPLE_ID": "int64", "URL": "string", "TEXT": "string", "HEIGHT": "int32",
                "WIDTH": "int32", "similarity": "float64", "LANGUAGE": "string", "punsafe": "float64",
                "pwatermark": "float64", "hash": "int64", "key": "string"}
TAR_MTIME = 0
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_ZEROS = bytes(_BLOCK)


class ExportReadError(IOError):
    """A source member could not be read back at the offset its index gave (the tar changed)."""


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def shard_file(shard: int, fmt: str) -> str:
    return shard_name(shard) + SUFFIX[fmt]


def marker_path(output: str, shard: int) -> str:
    return fsio.join(output, MARKERS_DIR, shard_name(shard) + ".json")


def plan_id(plan: dict) -> str:
    """A short fingerprint of everything that decides which sample lands where (subset, filters,
    order, shard size, format, row count): a marker of another plan does not make a shard complete."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- step 1: the member table of a source tar --------------------------------------------------------

class _NotPlainUstar(Exception):
    """A member header the fast reader does not handle (pax / GNU long names, base-256 sizes)."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _NotPlainUstar("base-256 number")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _index_headers(read, total: int | None) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of each regular member, from the 512-byte USTAR headers alone
    (`read(offset)`: the 512 bytes there): tarfile's reader costs ~0.5 ms per member in Python,
    this a few us (download writes plain USTAR)."""
    out, pos = [], 0
    while True:
        hdr = read(pos)
        if not hdr or hdr == _ZEROS:
            return out, None
        if len(hdr) < _BLOCK:
            return out, f"truncated tar: a header at offset {pos} is cut short"
        # the checksum counts its own field as 8 spaces
        if _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
            return out, f"unreadable tar: bad header checksum at offset {pos}"
        kind = hdr[156:157]
        if kind not in (b"0", b"\0", b"5", b"1", b"2"):
            raise _NotPlainUstar(f"member type {kind!r}")
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345:346] != b"\0":
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _octal(hdr[124:136])
        data = pos + _BLOCK
        if kind in (b"0", b"\0"):
            if total is not None and data + size > total:
                return out, f"truncated tar: {name.decode('utf-8', 'replace')} ends past the end of the file"
            out.append((name.decode("utf-8", "surrogateescape"), data, size))
        else:
            size = 0   # directories and links have no data
        pos = data + size + (-size % _BLOCK)


def _index_with_tarfile(fh, total: int | None) -> tuple[list[tuple[str, int, int]], str | None]:
    out, error = [], None
    try:
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if total is not None and member.offset_data + member.size > total:
                    error = f"truncated tar: {member.name} ends past the end of the file"
                    break
                out.append((member.name, member.offset_data, member.size))
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"unreadable tar after {len(out)} members: {type(exc).__name__}: {exc}"
    return out, error


def index_tar(uri: str, storage_options: dict | None = None) -> tuple[list[dict], str | None]:
    """([{key, ext, offset, size}] of the image members, error or None).

    One image per key (the first; txt/json members are skipped). A tar that cannot be opened gives
    no members and its error; a truncated or corrupt one gives the members whose data is wholly
    present and the error, so the rows whose image is lost are reported as missing rather than
    failing the export. Headers are read by seeking from one to the next (the data is not read);
    tars with pax or GNU headers go through tarfile.
    """
    try:
        fs, path = fsio.filesystem(uri, storage_options)
        total = fs.info(path).get("size")
        try:
            if fsio.is_remote(uri):
                with fs.open(path, "rb") as fh:
                    found, error = _index_headers(lambda pos: (fh.seek(pos), fh.read(_BLOCK))[1], total)
            elif total:   # mapped: a header is a slice, no system call per member
                with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    found, error = _index_headers(lambda pos: mm[pos:pos + _BLOCK], total)
            else:
                found, error = [], None
        except _NotPlainUstar:
            with fs.open(path, "rb") as fh:
                found, error = _index_with_tarfile(fh, total)
    except FileNotFoundError:
        return [], f"source shard not found: {uri}"
    except (OSError, ValueError) as exc:
        return [], f"unreadable tar: {type(exc).__name__}: {exc}"
    members: list[dict] = []
    seen: set[str] = set()
    for name, offset, size in found:
        key, ext = split_key(name)
        if ext in SIDECAR_EXTS or key in seen:
            continue
        seen.add(key)
        members.append({"key": key, "ext": ext, "offset": offset, "size": size})
    if not found and error is None and total:
        error = "unreadable tar: no members"
    return members, error


def missing_reason(tar_path: str | None, tar_error: str | None) -> str:
    """Why a row has no image: no source shard, or not in it (with the tar's own error, if any)."""
    if tar_path is None:
        return "no source shard (tar_path is null)"
    return f"not in source shard {tar_path}" + (f" ({tar_error})" if tar_error else "")


def locate(table, storage_options: dict | None = None):
    """The rows of one source tar (one `tar_path`) with their image member: `ext`, `offset` and
    `size`, null with `error_message` when the tar lacks it (or is missing / unreadable)."""
    import pyarrow as pa

    tar = table.column("tar_path")[0].as_py() if table.num_rows else None
    members, error = index_tar(tar, storage_options) if tar is not None else ([], None)
    by_key = {m["key"]: m for m in members}
    found = [by_key.get(k) for k in table.column("key").to_pylist()]
    reason = missing_reason(tar, error)
    return (table.append_column("ext", pa.array([m and m["ext"] for m in found], pa.string()))
            .append_column("offset", pa.array([m and m["offset"] for m in found], pa.int64()))
            .append_column("size", pa.array([m and m["size"] for m in found], pa.int64()))
            .append_column("error_message", pa.array([None if m else reason for m in found], pa.string())))


def bucket_counts(table, bucket_cols: list[str]):
    """Found / missing rows per bucket of one located group (the driver sums them over groups)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = pc.is_valid(table.column("offset"))
    counts = (pa.table({**{c: table.column(c) for c in bucket_cols},
                        "found": pc.cast(found, pa.int64()), "missing": pc.cast(pc.invert(found), pa.int64())})
              .group_by(bucket_cols).aggregate([("found", "sum"), ("missing", "sum")]))
    return counts.select([*bucket_cols, "found_sum", "missing_sum"]).rename_columns([*bucket_cols, "found", "missing"])


def bucket_offsets(counts: list[tuple[tuple, int]]) -> dict[tuple, tuple[int, int, int]]:
    """{bucket key: (bucket number, first position, rows)} for the buckets in sort order; `counts`:
    (bucket key, found rows). Positions are dense: a bucket starts where the one before it ends."""
    out, start = {}, 0
    for number, (key, rows) in enumerate(sorted(c for c in counts if c[1])):
        out[key] = (number, start, rows)
        start += rows
    return out


def place(table, bucket_cols: list[str], buckets: dict[tuple, tuple[int, int, int]], shard_size: int):
    """Each located row once per shard its bucket's positions overlap (`shard`; a bucket smaller
    than a shard overlaps one or two), with `_bidx` (the bucket's number) and `_offset` (its first
    position); a row without its image once, with shard null."""
    import numpy as np
    import pyarrow as pa

    n = table.num_rows
    found = table.column("offset").is_valid().to_numpy(zero_copy_only=False)
    info = np.full((n, 3), -1, dtype=np.int64)
    if len(bucket_cols) == 1 and buckets and all(isinstance(k[0], int) for k in buckets):
        # one integer bucket column (the shuffled order): a sorted search instead of a lookup per row
        known = np.array(sorted(k[0] for k in buckets), dtype=np.int64)
        table_info = np.array([buckets[(k,)] for k in known.tolist()], dtype=np.int64)
        values = table.column(bucket_cols[0]).fill_null(-1).to_numpy()
        at = np.minimum(np.searchsorted(known, values), known.size - 1)
        ok = known[at] == values
        if (found & ~ok).any():
            raise ValueError(f"bucket {values[found & ~ok][0]} is not in the export plan "
                             f"(the subset changed during the export)")
        info[found] = table_info[at[found]]
    else:
        for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in bucket_cols))):
            if found[i]:
                got = buckets.get(key)
                if got is None:
                    raise ValueError(f"bucket {key} is not in the export plan (the subset changed during the export)")
                info[i] = got
    first = np.where(found, info[:, 1] // shard_size, 0)
    last = np.where(found, (info[:, 1] + info[:, 2] - 1) // shard_size, 0)
    repeat = last - first + 1
    take = np.repeat(np.arange(n), repeat)
    step = np.arange(take.size) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    shard = pa.array((first[take] + step).astype(np.int32), mask=~found[take])
    out = table.take(pa.array(take))
    return (out.append_column("shard", shard)
            .append_column("_bidx", pa.array(info[take, 0], mask=~found[take]))
            .append_column("_offset", pa.array(info[take, 1], mask=~found[take])))


def shard_rows(table, shard: int, shard_size: int, within: list[str]):
    """The rows of `shard` among the placed rows sent to it, with `position`: the rows come sorted
    by bucket and the bucket's sort columns, each one's position is its bucket's first position plus
    its rank in the bucket (every row of each bucket is here, so the ranks are exact)."""
    import numpy as np
    import pyarrow as pa

    table = table.sort_by([("_bidx", "ascending"), *((c, "ascending") for c in within)])
    bidx = table.column("_bidx").to_numpy()
    n = bidx.size
    new = np.ones(n, dtype=bool)
    new[1:] = bidx[1:] != bidx[:-1]
    starts = np.flatnonzero(new)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    position = table.column("_offset").to_numpy() + rank
    keep = position // shard_size == shard
    return table.filter(pa.array(keep)).append_column("position", pa.array(position[keep], pa.int64()))


MANIFEST_COLUMNS = ("key", "SAMPLE_ID", "shard", "shard_file", "position", "tar_path", "status", "error_message")


def parquet_bytes(table, compression: str = "zstd") -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()


def located_name(tar_path: str | None) -> str:
    """The file of one source tar's located rows (see spark_jobs/export.py's job 1)."""
    return hashlib.sha1(repr(tar_path).encode()).hexdigest()[:20] + ".parquet"


def manifest_part(table, shard: int | None, fmt: str) -> bytes:
    """manifest/ rows (the EXPORT_MANIFEST schema) of one shard's rows, or of the rows without their
    image (shard None): a parquet file's bytes."""
    import pyarrow as pa

    n = table.num_rows
    schema = pa.schema([("key", pa.string()), ("SAMPLE_ID", pa.int64()), ("shard", pa.int32()),
                        ("shard_file", pa.string()), ("position", pa.int64()), ("tar_path", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string())])
    exported = shard is not None
    part = pa.table({
        "key": table.column("key"), "SAMPLE_ID": table.column("SAMPLE_ID"),
        "shard": pa.array([shard] * n if exported else [None] * n, pa.int32()),
        "shard_file": pa.array([shard_file(shard, fmt)] * n if exported else [None] * n, pa.string()),
        "position": table.column("position") if exported else pa.nulls(n, pa.int64()),
        "tar_path": table.column("tar_path"),
        "status": pa.array(["success" if exported else "missing_image"] * n, pa.string()),
        "error_message": pa.nulls(n, pa.string()) if exported else table.column("error_message"),
    }).cast(schema)
    return parquet_bytes(part)


# --- step 2: range reads from the source tars ------------------------------------------------------

class RangeReader:
    """Reads (uri, offset, size) ranges: local files with os.pread on handles kept open for the task,
    remote ones with fsspec's cat_ranges (concurrent requests on s3)."""

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = storage_options
        self._fds: dict[str, int] = {}

    def fd(self, uri: str) -> int:
        """A read handle on a local source tar, opened once per task."""
        fd = self._fds.get(uri)
        if fd is None:
            fd = self._fds[uri] = os.open(fsio.filesystem(uri)[1], os.O_RDONLY)
        return fd

    def read(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(ranges)
        remote: dict[str, list[int]] = {}
        for i, (uri, offset, size) in enumerate(ranges):
            if fsio.is_remote(uri):
                remote.setdefault(uri, []).append(i)
                continue
            out[i] = os.pread(self.fd(uri), size, offset)
        for uri, idx in remote.items():
            fs, path = fsio.filesystem(uri, self.storage_options)
            got = fs.cat_ranges([path] * len(idx), [ranges[i][1] for i in idx],
                                [ranges[i][1] + ranges[i][2] for i in idx])
            for i, data in zip(idx, got):
                out[i] = data
        for (uri, offset, size), data in zip(ranges, out):
            if isinstance(data, Exception) or data is None or len(data) != size:
                raise ExportReadError(f"{uri}: could not read {size} bytes at offset {offset}")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- step 2: the output shard ----------------------------------------------------------------------

def _json_value(value):
    return None if isinstance(value, float) and value != value else value  # NaN -> null


def sample_json(row: dict) -> bytes:
    """KEY.json: the LAION columns, keys sorted, UTF-8; NaN is written as null (orjson does that)."""
    return orjson.dumps({c: row.get(c) for c in LAION_COLUMNS}, option=orjson.OPT_SORT_KEYS)


def _pad(size: int) -> bytes:
    return _ZEROS[:-size % _BLOCK]


def _sidecars(key: str, text: str | None, js: bytes) -> bytes:
    """The caption and JSON members of one sample (headers, data, padding), which follow its image."""
    txt = (text or "").encode("utf-8")
    return b"".join((ustar_header(f"{key}.txt", len(txt)), txt, _pad(len(txt)),
                     ustar_header(f"{key}.json", len(js)), js, _pad(len(js))))


# The columns write_shard reads.
SHARD_COLUMNS = ("position", "tar_path", "offset", "size", "ext", *LAION_COLUMNS)


class _Rows:
    """A shard's rows as column lists, in position order: from a pyarrow Table (one to_pylist per
    column, no dict per row) or from a list of row dicts."""

    def __init__(self, rows):
        if isinstance(rows, list):
            rows = sorted(rows, key=lambda r: r["position"])
            self.cols = {c: [r.get(c) for r in rows] for c in SHARD_COLUMNS}
        else:
            rows = rows.sort_by("position")
            self.cols = {c: rows.column(c).to_pylist() if c in rows.column_names else [None] * rows.num_rows
                         for c in SHARD_COLUMNS}
        self.n = len(self.cols["position"])

    def __len__(self) -> int:
        return self.n

    def jsons(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        """KEY.json of rows[start:stop] (see sample_json)."""
        values = zip(*(self.cols[c][start:stop] for c in LAION_COLUMNS))
        return [orjson.dumps(dict(zip(LAION_COLUMNS, v)), option=orjson.OPT_SORT_KEYS) for v in values]

    def ranges(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        c = self.cols
        return list(zip(c["tar_path"][start:stop], c["offset"][start:stop], c["size"][start:stop]))


def _trailer(end: int) -> bytes:
    """Two zero blocks, then zeros to a whole tar record (what tarfile writes on close)."""
    end += 2 * _BLOCK
    return bytes(2 * _BLOCK + (-end % _RECORD))


class _AtomicOut:
    """A file that appears under its name only when complete: a hidden local sibling, flushed to disk
    (the marker written next says the shard is complete) and renamed on close; on an object store the
    upload becomes visible on close. Its size is then verified. A context manager: an exception
    inside removes the partial file."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri, self.storage_options = uri, storage_options
        self.fs, self.path = fsio.filesystem(uri, storage_options)
        self.remote = fsio.is_remote(uri)
        if self.remote:
            self.target = self.path
            self.fh = self.fs.open(self.target, "wb")
        else:
            folder = os.path.dirname(self.path) or "."
            os.makedirs(folder, exist_ok=True)
            self.target = os.path.join(folder, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp")
            self.fh = open(self.target, "wb")
        self.count = 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.count += len(data)

    def close(self) -> int:
        if not self.remote:
            self.fh.flush()
            os.fsync(self.fh.fileno())
        self.fh.close()
        if not self.remote:
            os.replace(self.target, self.path)
        verify_size(self.uri, self.count, self.storage_options)
        return self.count

    def abort(self) -> None:
        try:
            self.fh.close()
            if self.fs.exists(self.target):
                self.fs.rm(self.target)
        except Exception:  # noqa: BLE001 - already failing: keep the original error
            pass

    def __enter__(self) -> "_AtomicOut":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _ustar_constants() -> tuple[bytes, bytes, int]:
    """The fixed parts of our USTAR member header (mode 0644, uid/gid 0, mtime TAR_MTIME, regular
    file, no owner names), and their byte sum for the checksum."""
    middle = b"0000644\0" + b"0000000\0" * 2          # mode, uid, gid
    after_size = b"%011o\0" % TAR_MTIME + b" " * 8     # mtime, checksum placeholder
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 155 + 12)   # no owner names or device numbers
    return middle, after_size, tail


_MIDDLE, _AFTER_SIZE, _TAIL = _ustar_constants()
_CONST_SUM = sum(_MIDDLE) + sum(_AFTER_SIZE) + sum(_TAIL)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for TarInfo(name) with our fixed metadata, built from
    constants (tarfile's own builder is most of the time of writing a shard of small images)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:   # long names / huge members: tarfile's general path
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _CONST_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), _MIDDLE, size_field, _AFTER_SIZE[:12], b"%06o\0 " % checksum, _TAIL))


# errno of a copy_file_range the kernel or filesystem does not do: copy through user space instead
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


class _RangeCopier:
    """Copies byte ranges between local files inside the kernel (os.copy_file_range: no copy through
    Python), falling back to pread/pwrite where the kernel or filesystem refuses."""

    def __init__(self):
        self.in_kernel = hasattr(os, "copy_file_range")

    def copy(self, src: int, dst: int, size: int, src_offset: int, dst_offset: int, uri: str) -> None:
        done = 0
        while done < size:
            n = 0
            if self.in_kernel:
                try:
                    n = os.copy_file_range(src, dst, size - done, src_offset + done, dst_offset + done)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    self.in_kernel = False
                    continue
            else:
                data = os.pread(src, min(size - done, 1 << 20), src_offset + done)
                n = os.pwrite(dst, data, dst_offset + done) if data else 0
            if n <= 0:
                raise ExportReadError(f"{uri}: could not read {size} bytes at offset {src_offset}")
            done += n


def _write_tar_local(out: _AtomicOut, rows: _Rows, reader: RangeReader) -> int:
    """A shard whose sources and output are local files: a copy, not a re-encode.

    All member sizes are known (the image sizes from the index), so the layout is fixed first: the
    bytes between two images (the image's padding, its txt and json members, the next header) are
    written with one pwrite each, in output order; then the images are copied into their places
    inside the kernel, sorted by source tar and offset, so each source is read front to back once.
    Returns the image bytes."""
    fd = out.fh.fileno()
    copies = []
    pos, gap = 0, b""
    c = rows.cols
    for key, ext, text, js, tar, offset, size in zip(c["key"], c["ext"], c["TEXT"], rows.jsons(), c["tar_path"],
                                                     c["offset"], c["size"]):
        gap += ustar_header(f"{key}.{ext}", size)
        os.pwrite(fd, gap, pos)
        pos += len(gap)
        copies.append((tar, offset, size, pos))
        pos += size
        gap = _pad(size) + _sidecars(key, text, js)
    gap += _trailer(pos + len(gap))
    os.pwrite(fd, gap, pos)
    out.count = pos + len(gap)
    copier = _RangeCopier()
    copies.sort()
    for uri, offset, size, at in copies:
        copier.copy(reader.fd(uri), fd, size, offset, at, uri)
    return sum(c[2] for c in copies)


def _write_tar_chunks(out: _AtomicOut, rows: _Rows, reader: RangeReader, chunk: int) -> int:
    """A shard with a remote source or output: images read by range a chunk at a time (concurrent
    requests on s3), each chunk's members written as one buffer. Returns the image bytes."""
    image_bytes = 0
    c = rows.cols
    for start in range(0, len(rows), chunk):
        stop = start + chunk
        images = reader.read(rows.ranges(start, stop))
        parts = []
        for key, ext, text, js, image in zip(c["key"][start:stop], c["ext"][start:stop], c["TEXT"][start:stop],
                                             rows.jsons(start, stop), images):
            image_bytes += len(image)
            parts += (ustar_header(f"{key}.{ext}", len(image)), image, _pad(len(image)), _sidecars(key, text, js))
        out.write(b"".join(parts))
    out.write(_trailer(out.count))
    return image_bytes


def hf_features() -> dict:
    """The Hugging Face `datasets` features of a parquet shard (its documented JSON form)."""
    dtypes = {"int64": "int64", "int32": "int32", "float64": "float64", "string": "string"}
    features = {"image": {"_type": "Image"}}
    features.update({c: {"dtype": dtypes[t], "_type": "Value"} for c, t in COLUMN_TYPES.items()})
    return features


def parquet_schema():
    import pyarrow as pa

    fields = [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    fields += [pa.field(c, getattr(pa, t)()) for c, t in COLUMN_TYPES.items()]
    meta = {b"huggingface": json.dumps({"info": {"features": hf_features()}}).encode()}
    return pa.schema(fields, metadata=meta)


def _parquet_chunk(rows: _Rows, start: int, stop: int, images: list[bytes]):
    import pyarrow as pa

    schema = parquet_schema()
    c = rows.cols
    cols = {"image": [{"bytes": img, "path": f"{k}.{e}"}
                      for k, e, img in zip(c["key"][start:stop], c["ext"][start:stop], images)]}
    for name in COLUMN_TYPES:
        cols[name] = [_json_value(v) for v in c[name][start:stop]]
    return pa.Table.from_pydict(cols, schema=schema)


def _write_parquet(out: _AtomicOut, rows: _Rows, reader: RangeReader, chunk: int) -> int:
    """One row group per chunk of images. Returns the image bytes."""
    import pyarrow.parquet as pq

    image_bytes = 0
    # Image bytes are encoded already: no compression, dictionary or min/max statistics over them
    # (statistics would copy two whole images into every row group's footer).
    compression = {c: "zstd" for c in COLUMN_TYPES}
    compression.update({"image.bytes": "none", "image.path": "zstd"})
    plain = [*COLUMN_TYPES, "image.path"]
    with pq.ParquetWriter(out.fh, parquet_schema(), compression=compression, use_dictionary=plain,
                          write_statistics=plain) as writer:
        for start in range(0, len(rows), chunk):
            images = reader.read(rows.ranges(start, start + chunk))
            image_bytes += sum(len(i) for i in images)
            writer.write_table(_parquet_chunk(rows, start, start + chunk, images))
    out.count = out.fh.tell()
    return image_bytes


def read_marker(output: str, shard: int, storage_options: dict | None = None) -> dict | None:
    uri = marker_path(output, shard)
    try:
        return fsio.read_json(uri, storage_options)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return None   # a marker that does not parse marks nothing complete


def write_shard(output: str, shard: int, rows, settings: dict) -> dict:
    """Write one output shard (unless its marker says it is complete for this plan).

    `rows`: the shard's samples (a pyarrow Table, or a list of dicts), each with `position` (order
    in the export), `tar_path`, `offset`, `size`, `ext` and the LAION columns. `settings`: format, plan (plan_id), read_chunk,
    storage_options. Returns {shard, file, samples, bytes, image_bytes, status: written|skipped, seconds}.
    """
    t0 = time.time()
    fmt, so = settings["format"], settings.get("storage_options")
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    name = shard_file(shard, fmt)
    uri = fsio.join(output, name)
    marker = read_marker(output, shard, so)
    if marker is not None and marker.get("plan") == settings["plan"] and marker.get("file") == name:
        return {"shard": shard, "file": name, "samples": int(marker["samples"]), "bytes": int(marker["bytes"]),
                "image_bytes": int(marker.get("image_bytes", 0)), "status": "skipped",
                "seconds": round(time.time() - t0, 3)}
    rows = _Rows(rows)
    chunk = max(1, int(settings.get("read_chunk") or 256))
    local = not fsio.is_remote(uri) and not any(fsio.is_remote(t) for t in set(rows.cols["tar_path"]))
    with contextlib.closing(RangeReader(so)) as reader, _AtomicOut(uri, so) as out:
        if fmt == "parquet":
            image_bytes = _write_parquet(out, rows, reader, chunk)
        elif local:
            image_bytes = _write_tar_local(out, rows, reader)
        else:
            image_bytes = _write_tar_chunks(out, rows, reader, chunk)
    size = out.count
    body = {"shard": shard, "file": name, "samples": len(rows), "bytes": size, "image_bytes": image_bytes,
            "plan": settings["plan"]}
    data = json.dumps(body, sort_keys=True).encode()
    fsio.write_bytes_atomic(marker_path(output, shard), data, so)   # last: the shard is complete
    verify_size(marker_path(output, shard), len(data), so)
    return {"shard": shard, "file": name, "samples": len(rows), "bytes": size, "image_bytes": image_bytes,
            "status": "written", "seconds": round(time.time() - t0, 3)}


# --- the files that describe the export ------------------------------------------------------------

def list_shard_files(output: str, storage_options: dict | None = None) -> dict[str, int]:
    """{file name: shard number} of the `NNNNN.tar` / `NNNNN.parquet` files and markers under output."""
    fs, root = fsio.filesystem(output, storage_options)
    root = root.rstrip("/")
    found: dict[str, int] = {}
    for folder in (root, f"{root}/{MARKERS_DIR}"):
        try:
            names = fs.ls(folder, detail=False)
        except FileNotFoundError:
            continue
        for full in names:
            base = full.rstrip("/").rsplit("/", 1)[-1]
            stem, dot, ext = base.partition(".")
            if dot and stem.isdigit() and ext in ("tar", "parquet", "json"):
                rel = base if folder == root else f"{MARKERS_DIR}/{base}"
                found[rel] = int(stem)
    return found


def remove_stale(output: str, keep: set[str], storage_options: dict | None = None) -> list[str]:
    """Delete shard files and markers of an earlier export that this one did not write (another
    shard count or format), so the folder holds exactly what sizes.json lists."""
    fs, root = fsio.filesystem(output, storage_options)
    removed = []
    for rel in sorted(list_shard_files(output, storage_options)):
        if rel in keep:
            continue
        fs.rm(f"{root.rstrip('/')}/{rel}")
        removed.append(rel)
    return removed
