"""The dedup stage's stats come from the parquet footers of what it wrote (no count jobs):
checked against Spark's own count of the same folders, locally and on S3 (moto, loopback)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import datasets
from tests.test_dedup import CRAWLS, pair, run_dedup, write_input


def test_footer_counts_read_partition_folders_only(tmp_path):
    root = tmp_path / "ds"
    table = pa.table({"uid": ["a", "b", "c"]})
    for folder, copies in (("crawl=CC-MAIN-2024-10", 2), ("crawl=CC%3Aodd", 1),
                           ("crawl=__HIVE_DEFAULT_PARTITION__", 1)):
        (root / folder).mkdir(parents=True)
        for i in range(copies):
            pq.write_table(table, root / folder / f"part-{i}.parquet")
    pq.write_table(table, root / "crawl=CC-MAIN-2024-10" / "_hidden.parquet")  # not data, as for Spark
    (root / "_stats").mkdir()
    pq.write_table(table, root / "_stats" / "x.parquet")                        # not a partition
    assert datasets.footer_counts(str(root), "crawl") == {"CC-MAIN-2024-10": 6, "CC:odd": 3, "None": 3}
    assert datasets.footer_counts(str(tmp_path / "missing"), "crawl") == {}


def test_footer_counts_on_s3(moto_s3):
    moto_s3.bucket("dedup-out")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"uid": [str(i) for i in range(7)]}), sink)
    for key in ("out/status=duplicate/part-0.parquet", "out/status=duplicate/part-1.parquet",
                "out/status=seen_before/part-0.parquet", "out/_SUCCESS"):
        moto_s3.client.put_object(Bucket="dedup-out", Key=key,
                                  Body=b"" if key.endswith("_SUCCESS") else sink.getvalue().to_pybytes())
    counts = datasets.footer_counts("s3://dedup-out/out", "status", moto_s3.options)
    assert counts == {"duplicate": 14, "seen_before": 7}


@pytest.mark.slow
def test_stage_stats_equal_what_spark_counts_in_the_written_folders(spark, cfg, tmp_path):
    dcfg = cfg.with_overrides(["dedup.shards=3", "dedup.expected_keys=20000"])
    rows = [pair(i, crawl=CRAWLS[i % 2]) for i in range(400)] + [pair(i, crawl=CRAWLS[i % 2]) for i in range(90)]
    src = write_input(spark, tmp_path / "in", rows)
    stats = run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o", "--seen", tmp_path / "seen")
    again = run_dedup(spark, dcfg, "--input", src, "--output", tmp_path / "o2", "--seen", tmp_path / "seen")
    for s, out in ((stats, tmp_path / "o"), (again, tmp_path / "o2")):
        assert s["output_rows_by_crawl"] == datasets.count_by(spark, str(out), "crawl")
        assert s["rejected_by_status"] == datasets.count_by(spark, str(out) + "_rejected", "status")
        assert s["input_rows"] == len(rows) == s["output_rows"] + s["rejected_rows"]
    assert stats["output_rows_by_crawl"] == {CRAWLS[0]: 200, CRAWLS[1]: 200}
    assert stats["rejected_by_status"] == {"duplicate": 90}
    assert again["rejected_by_status"] == {"duplicate": 90, "seen_before": 400}
