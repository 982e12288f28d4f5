"""export benchmark: `clipcrawl export` (shuffled webdataset shards) against copying the same bytes
with `cat`, measured side by side on the same disk.

Data: download-like shards (`{shard:05d}.tar` with KEY.jpg / KEY.txt / KEY.json) whose images are
random bytes of 10-40 KB (256 px JPEGs at quality 95 are that size; export never decodes them),
and a subset parquet naming every sample, so the export writes about as many bytes as the source
holds. `cat` copies the source tars into one file: the floor of any copy. The export is timed
whole (index, shard assignment, writing, manifest and stats, on a started local[2] session) and
its write phase alone. The page cache is warm for both (cat runs once before, to warm it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path


def make_source(root: Path, shards: int, per_shard: int, seed: int = 0) -> int:
    """Source tars and a subset parquet under root; returns the source bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    images, subset = root / "images", root / "dataset" / "laion2B-en"
    images.mkdir(parents=True)
    subset.mkdir(parents=True)
    rows = []
    for shard in range(shards):
        path = images / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                text = f"a photo of item {key} on a wooden table"
                meta = json.dumps({"key": key, "status": "success"}).encode()
                for ext, data in (("jpg", rng.randbytes(rng.randint(10_000, 40_000))), ("txt", text.encode()),
                                  ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sid = rng.getrandbits(63)
                rows.append({"SAMPLE_ID": sid, "URL": f"https://img.example/{key}.jpg", "TEXT": text, "HEIGHT": 256,
                             "WIDTH": 256, "similarity": 0.3, "LANGUAGE": "en", "punsafe": None, "pwatermark": None,
                             "hash": sid, "key": key, "tar_path": str(path)})
    schema = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
                        ("HEIGHT", pa.int32()), ("WIDTH", pa.int32()), ("similarity", pa.float64()),
                        ("LANGUAGE", pa.string()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
                        ("hash", pa.int64()), ("key", pa.string()), ("tar_path", pa.string())])
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half], schema=schema), subset / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:], schema=schema), subset / "part-00001.parquet")
    return sum(p.stat().st_size for p in images.glob("*.tar"))


def time_cat(src: Path, dst: Path) -> float:
    dst.mkdir(parents=True, exist_ok=True)
    tars = sorted(str(p) for p in src.glob("*.tar"))
    t0 = time.perf_counter()
    with open(dst / "all.tar", "wb") as out:
        subprocess.run(["cat", *tars], stdout=out, check=True)
    seconds = time.perf_counter() - t0
    os.remove(dst / "all.tar")
    return seconds


def run(work: Path, quick: bool) -> list[dict]:
    from spark_jobs import export
    from spark_jobs.config import load_config
    from spark_jobs.session import get_spark

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shards, per_shard = (4, 500) if quick else (16, 1000)
    source_bytes = make_source(work, shards, per_shard)
    cfg = load_config("local", overrides=[
        "spark.master=local[2]", "spark.conf.spark.driver.memory=2g", "spark.conf.spark.ui.enabled=false",
        "spark.conf.spark.ui.showConsoleProgress=false", "spark.conf.spark.sql.shuffle.partitions=4",
        f"spark.conf.spark.local.dir={work / 'spark-local'}", "export.shard_size=1000"])
    spark = get_spark(cfg, "bench-export")
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)

    time_cat(work / "images", work / "cat")            # warm the page cache for both
    cat_before = time_cat(work / "images", work / "cat")
    t0 = time.perf_counter()
    stats = export.run(spark, cfg, parser.parse_args(["--dataset", str(work / "dataset"),
                                                      "--output", str(work / "export")]))
    export_seconds = time.perf_counter() - t0
    cat_after = time_cat(work / "images", work / "cat")
    cat_seconds = (cat_before + cat_after) / 2
    out_bytes = stats["bytes"]
    ours = out_bytes / export_seconds / 1e6
    write_only = out_bytes / stats["phase_seconds"]["write_shards"] / 1e6
    peer = source_bytes / cat_seconds / 1e6
    samples = shards * per_shard
    note = (f"{samples} samples, {source_bytes / 1e6:.0f} MB source -> {out_bytes / 1e6:.0f} MB in "
            f"{stats['shards']} shuffled shards; local[2] on a shared 2-core machine; cat {cat_before:.2f}s / "
            f"{cat_after:.2f}s, export {export_seconds:.1f}s (phases {stats['phase_seconds']})")
    assert stats["output_rows"] == samples, stats["by_status"]
    return [
        {"name": "export_throughput", "value": round(ours, 1), "unit": "MB/s", "peer": "cat (same bytes)",
         "peer_value": round(peer, 1), "ratio": round(ours / peer, 3), "goal": ">= 0.5", "note": note},
        {"name": "export_write_phase_throughput", "value": round(write_only, 1), "unit": "MB/s",
         "peer": "cat (same bytes)", "peer_value": round(peer, 1), "ratio": round(write_only / peer, 3),
         "goal": "", "note": "the shard-writing Spark job alone (range reads + tar writes + markers)"},
        {"name": "export_samples_per_second", "value": round(samples / export_seconds, 1), "unit": "samples/s",
         "peer": "", "peer_value": None, "ratio": None, "goal": "", "note": "whole stage"},
    ]


if __name__ == "__main__":
    import sys

    for fig in run(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/work/export"), "--quick" in sys.argv):
        print(fig)
