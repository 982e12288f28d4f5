"""The export's file layout, shared by its steps: formats and names, the plan fingerprint, the
manifest parts and the listing of an output folder's shard files and markers."""

from __future__ import annotations

import hashlib
import json
import tarfile

from udfs import fsio

FORMATS = ("webdataset", "parquet")
SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
MARKERS_DIR = "_markers"
# Members of a download tar that are not the image (the caption and the download record).
SIDECAR_EXTS = ("txt", "json")
# Where download put each image in its tar (subset columns; null in subsets from older runs).
RECORDED_COLUMNS = ("image_offset", "image_size")
# The subset's LAION columns, as written to KEY.json and to the parquet shards (tar_path, the source
# shard's URI, stays in the manifest: it means nothing once the shards are copied elsewhere).
LAION_COLUMNS = ("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "similarity", "LANGUAGE", "punsafe",
                 "pwatermark", "hash", "key")
# Arrow type names of LAION_COLUMNS (the SUBSET schema in spark_jobs/schemas.py).
COLUMN_TYPES = {"SAMPLE_ID": "int64", "URL": "string", "TEXT": "string", "HEIGHT": "int32",
                "WIDTH": "int32", "similarity": "float64", "LANGUAGE": "string", "punsafe": "float64",
                "pwatermark": "float64", "hash": "int64", "key": "string"}
TAR_MTIME = 0
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
ZEROS = bytes(BLOCK)


class ExportReadError(IOError):
    """A source member could not be read back at the offset its index gave (the tar changed)."""


def binary_values(column) -> list[bytes]:
    """A string or binary Arrow column as bytes (null as b""), sliced from its data buffer: a few
    times faster than to_pylist, which builds each value through an Arrow scalar."""
    import numpy as np
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    large = pa.types.is_large_binary(array.type) or pa.types.is_large_string(array.type)
    if not (large or pa.types.is_binary(array.type) or pa.types.is_string(array.type)):
        array = array.cast(pa.string())
    if array.null_count:
        array = array.fill_null(pa.scalar(b"", pa.large_binary() if large else pa.binary()).cast(array.type))
    if not len(array):
        return []
    _, offsets, data = array.buffers()
    at = np.frombuffer(offsets, dtype=np.int64 if large else np.int32)[array.offset:array.offset + len(array) + 1].tolist()
    blob = memoryview(data)[at[0]:at[-1]].tobytes() if data is not None else b""
    base = at[0]
    return [blob[a - base:b - base] for a, b in zip(at, at[1:])]


def path_codes(column):
    """(each row's path as a number into the distinct paths, -1 for null; the distinct paths): a
    string column dictionary-encoded once, so a shard's rows are grouped by source tar without a
    str per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    return (encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


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



MANIFEST_COLUMNS = ("key", "SAMPLE_ID", "shard", "shard_file", "position", "tar_path", "status", "error_message")


def parquet_bytes(table, compression: str = "zstd") -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()



def manifest_part(table, shard: int, fmt: str) -> bytes:
    """manifest/ rows (the EXPORT_MANIFEST schema) of the rows placed in one shard, a parquet file's
    bytes: those with their image (`offset` set) are in the shard at their `position`, the others
    are missing_image with their `error_message`, in no shard."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = pa.schema([("key", pa.string()), ("SAMPLE_ID", pa.int64()), ("shard", pa.int32()),
                        ("shard_file", pa.string()), ("position", pa.int64()), ("tar_path", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string())])
    found = pc.is_valid(table.column("offset"))
    n = table.num_rows

    def when_found(value, kind):
        return pc.if_else(found, pa.array([value] * n, kind), pa.nulls(n, kind))

    part = pa.table({
        "key": table.column("key"), "SAMPLE_ID": table.column("SAMPLE_ID"),
        "shard": when_found(shard, pa.int32()), "shard_file": when_found(shard_file(shard, fmt), pa.string()),
        "position": pc.if_else(found, table.column("position"), pa.nulls(n, pa.int64())),
        "tar_path": table.column("tar_path"),
        "status": pc.if_else(found, pa.array(["success"] * n), pa.array(["missing_image"] * n)),
        "error_message": pc.if_else(found, pa.nulls(n, pa.string()), table.column("error_message")),
    }).cast(schema)
    return parquet_bytes(part)


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


def check_section(section: dict, fmt: str | None, limit: int | None) -> dict:
    """The export section's integers and the format (`fmt`, --format, wins over export.format),
    checked on the driver; a bad value is a ValueError (the stage reports it as a config error)."""
    fmt = fmt or section["format"]
    if fmt not in FORMATS:
        raise ValueError(f"export.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ints = {}
    for key in ("shard_size", "read_chunk", "rank_bucket_rows", "max_listed_missing", "shuffle_seed"):
        try:
            ints[key] = int(section[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"export.{key} must be an integer, got {section[key]!r}") from exc
    for key in ("shard_size", "read_chunk", "rank_bucket_rows"):
        if ints[key] < 1:
            raise ValueError(f"export.{key} must be >= 1, got {ints[key]}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    return {**ints, "format": fmt}


def footer_rows(path: str, storage_options: dict | None = None) -> int | None:
    """Rows of a parquet dataset from its files' footers (no scan); None where they cannot be read."""
    import pyarrow.parquet as pq

    fs, root = fsio.filesystem(path, storage_options)
    try:
        rows = 0
        for f in fs.find(root):
            if f.endswith(".parquet") and "/_" not in f[len(root):]:
                with fs.open(f, "rb") as fh:
                    rows += pq.ParquetFile(fh).metadata.num_rows
        return rows
    except (OSError, ValueError):
        return None


def source_fingerprint(path: str, storage_options: dict | None = None) -> list:
    """(name, size) of the subset's files: a changed subset is another export plan."""
    fs, root = fsio.filesystem(path, storage_options)
    try:
        entries = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("size")) for e in entries
                  if e.get("type") == "file" and not e["name"].rsplit("/", 1)[-1].startswith(("_", ".")))


def open_clip_command(output: str, shards: int, samples: int) -> str:
    """The open_clip training arguments that read the export."""
    last = f"{max(shards - 1, 0):05d}"
    return (f"--train-data '{output.rstrip('/')}/{{00000..{last}}}.tar' --train-num-samples {samples} "
            f"--dataset-type webdataset")


def summarize(results: list[dict], selected: int, planned_shards: int, max_listed: int) -> dict:
    """The shard tasks' results (shards.write_partition's rows) as sizes.json, the files to keep and
    the counts of the stats: every planned shard reported once, and its samples plus its missing
    images are the selected rows planned for it (the plan counted them before any tar was read)."""
    shards = sorted(results, key=lambda r: r["shard"])
    missing = sum(int(r["missing"]) for r in shards)
    sizes = {r["file"]: int(r["samples"]) for r in shards}
    written = sum(sizes.values())
    if written + missing != selected or [r["shard"] for r in shards] != list(range(planned_shards)):
        raise RuntimeError(f"export wrote {written} samples in {len(sizes)} shards and found {missing} missing "
                           f"images, but planned {selected} selected rows in {planned_shards} shards")
    # the first max_listed missing rows by (tar_path, key), nulls last: the same list whatever the shards
    listed = sorted((m for r in shards if r["listed"] for m in json.loads(r["listed"])),
                    key=lambda m: (m["tar_path"] is None, m["tar_path"] or "", m["key"] or ""))[:max_listed]
    counts = {
        "shards": planned_shards, "shards_written": sum(1 for r in shards if r["status"] == "written"),
        "shards_skipped": sum(1 for r in shards if r["status"] == "skipped"),
        "bytes": sum(int(r["bytes"]) for r in shards), "image_bytes": sum(int(r["image_bytes"]) for r in shards),
        # time inside the shard tasks' write_shard (copies, fsyncs, markers), summed over the tasks:
        # against the write_shards phase's wall time it shows what the Spark job adds
        "shard_task_seconds": round(sum(float(r["seconds"]) for r in shards), 3),
    }
    return {"sizes": sizes, "written": written, "missing": missing, "shard_counts": counts,
            "listed": listed,
            "keep": set(sizes) | {f"{MARKERS_DIR}/{shard_name(r['shard'])}.json" for r in shards}}


def source_info(subset_path: str, filter_stats_uri: str, storage_options: dict | None = None) -> dict:
    """Where the subset came from: the filter stage's stats (`filter_stats_uri`, beside the subset's
    folder), when present."""
    try:
        stats = fsio.read_json(filter_stats_uri, storage_options)
        chosen = {k: stats.get(k) for k in ("written_at", "input", "thresholds", "language_detector")}
    except (FileNotFoundError, ValueError, OSError):
        chosen = None
    return {"subset_path": subset_path, "filter": chosen}
