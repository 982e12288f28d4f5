"""Contract tests of the `wat-extract` stage on the shared local[2] session: schema, partitioning,
counts by reason, per-file outcomes, the real Common Crawl fixtures, S3 input (moto)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from spark_jobs import datasets, schemas, wat_extract
from spark_jobs.config import ConfigError
from tests.gen import wat_writer as ww
from udfs import ids

REPO = Path(__file__).resolve().parent.parent


def stage_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    wat_extract.add_arguments(parser)
    return parser.parse_args(list(argv))


def small(cfg, *overrides):
    return cfg.with_overrides(["wat_extract.output_partitions=2", *overrides])


@pytest.fixture(scope="module")
def wat_run(spark, cfg, tmp_path_factory, commoncrawl_fixtures):
    """One stage run over every bad case: a glob, a paths file with relative entries (one of them
    missing) and the real request-only WAT."""
    root = tmp_path_factory.mktemp("wat_stage")
    cases = ww.bad_case_files(root / "in")
    listed = ["in/" + os.path.basename(cases[n].path) for n in ("not_gzip", "empty", "request_only", "plain")]
    listed.append("in/does-not-exist.warc.wat.gz")
    paths = ww.write_paths_file(root / "wat.paths.gz", listed, gzip=True)
    out = str(root / "wat_pairs")
    args = stage_args("--input", str(root / "in" / "CC-MAIN-*.warc.wat.gz"),
                      str(commoncrawl_fixtures / "whirlwind.warc.wat.gz"),
                      "--paths-file", str(paths), "--output", out)
    stats = wat_extract.run(spark, small(cfg, f"wat_extract.paths_base={root}/"), args)
    return {"root": root, "cases": cases, "out": out, "stats": stats}


@pytest.mark.slow
def test_outputs_have_declared_schema_and_partitioning(spark, wat_run):
    out = wat_run["out"]
    df = datasets.read_dataset(spark, out, schemas.WAT_PAIRS)
    declared = {f.name: f.dataType for f in schemas.WAT_PAIRS.schema.fields}
    assert {f.name: f.dataType for f in df.schema.fields} == declared
    crawls = sorted(p.name for p in Path(out).iterdir() if p.name.startswith("crawl="))
    assert crawls == ["crawl=CC-MAIN-2024-22", "crawl=unknown"]
    rejected = spark.read.parquet(datasets.rejected_path(out))
    assert set(rejected.columns) == set(schemas.WAT_REJECTED.schema.fieldNames())
    assert all(p.name.startswith("status=") for p in Path(datasets.rejected_path(out)).iterdir()
               if p.is_dir())
    rows = df.collect()
    assert all(r.uid == ids.pair_uid(r.url, r.text) for r in rows)
    assert all(r.url.startswith(("http://", "https://")) and len(r.text) >= 5 for r in rows)


@pytest.mark.slow
def test_counts_by_reason_match_the_generated_files(spark, wat_run):
    cases, stats, out = wat_run["cases"], wat_run["stats"], wat_run["out"]
    written = datasets.read_stats(out)
    assert written["pairs_kept"] == stats["pairs_kept"] and written["stage"] == "wat-extract"
    expected_pairs = Counter(cases["mixed"].summary.pairs + cases["truncated"].summary.pairs
                             + cases["plain"].summary.pairs)
    got = Counter((r.url, r.text) for r in spark.read.parquet(out).select("url", "text").collect())
    assert got == expected_pairs
    expected_rejects = (cases["mixed"].summary.link_rejects + cases["mixed"].summary.record_rejects
                        + Counter({"invalid_json": 1}))   # the record cut by the truncation
    assert Counter(stats["rejected_by_reason"]) == expected_rejects
    # every image link seen is either kept or rejected with a reason
    assert stats["links_accounted"] is True
    assert stats["links_seen"] == stats["pairs_kept"] + stats["rejected_links"]
    assert stats["rejected_records"] == sum(cases["mixed"].summary.record_rejects.values()) + 1
    assert stats["alt_truncated"] == cases["mixed"].summary.truncated_pairs
    assert stats["records_non_utf8"] == 1
    assert stats["files"] == {"total": 8, "ok": 4, "partial": 1, "failed": 3}
    assert stats["pairs_kept_by_crawl"]["unknown"] == len(cases["plain"].summary.pairs)


@pytest.mark.slow
def test_file_outcome_table(spark, wat_run):
    out, cases, root = wat_run["out"], wat_run["cases"], wat_run["root"]
    outcomes = {Path(r.source_file).name: r for r in
                datasets.read_dataset(spark, datasets.stats_path(out, "file_outcomes"),
                                      schemas.WAT_FILE_OUTCOMES).collect()}
    used = ("mixed", "truncated", "not_gzip", "empty", "request_only", "plain", "missing")
    expected = {Path(cases[n].path).name: (cases[n].expect_status, cases[n].expect_error) for n in used}
    expected["whirlwind.warc.wat.gz"] = ("ok", None)
    assert {n: (o.status, (o.error_message or "").split(":")[0] or None) for n, o in outcomes.items()} == expected
    assert outcomes["whirlwind.warc.wat.gz"].records_read == 2
    assert outcomes["whirlwind.warc.wat.gz"].html_records == 0
    truncated = outcomes[Path(cases["truncated"].path).name]
    assert truncated.pairs_kept == len(cases["truncated"].summary.pairs) > 0
    assert all(o.links_seen == o.pairs_kept + o.pairs_rejected for o in outcomes.values())
    # the missing entry of the paths list was resolved against wat_extract.paths_base
    assert str(root / "in" / "does-not-exist.warc.wat.gz") in {o.source_file for o in outcomes.values()}


@pytest.mark.slow
def test_real_warc_fixture_with_the_warcio_reader(spark, cfg, tmp_path, commoncrawl_fixtures):
    from tests.test_wat_units import WHIRLWIND_IMAGES

    out = str(tmp_path / "warc_pairs")
    args = stage_args("--format", "warc", "--input", str(commoncrawl_fixtures / "whirlwind.warc.gz"),
                      "--output", out, "--rejected-output", str(tmp_path / "rej"))
    stats = wat_extract.run(spark, small(cfg, "wat_extract.reader=warcio"), args)
    assert stats["reader"] == "warcio" and stats["format"] == "warc"
    pairs = spark.read.parquet(out).select("url", "text", "page_url").collect()
    assert sorted((r.url, r.text) for r in pairs) == sorted((u, t) for u, t, s in WHIRLWIND_IMAGES if s == "keep")
    assert {r.page_url for r in pairs} == {"https://an.wikipedia.org/wiki/Escopete"}
    assert stats["rejected_by_reason"] == {"missing_alt": 4, "empty_alt": 2}
    assert datasets.count_by(spark, str(tmp_path / "rej")) == stats["rejected_by_reason"]


@pytest.fixture
def s3_bucket(moto_s3):
    moto_s3.bucket("cc-wat")
    return moto_s3.client, moto_s3.endpoint

@pytest.mark.slow
def test_stage_reads_wat_files_from_s3(spark, cfg, tmp_path, s3_bucket):
    client, endpoint = s3_bucket
    pages = ww.random_pages(5, seed=3, bad_link_rate=0.2)
    summary = ww.write_wat(tmp_path / "a.warc.wat.gz", pages)
    key = "crawl-data/CC-MAIN-2024-10/segments/1/wat/a.warc.wat.gz"
    client.put_object(Bucket="cc-wat", Key=key, Body=Path(summary.path).read_bytes())
    client.put_object(Bucket="cc-wat", Key="wat.paths", Body=f"{key}\n".encode())
    s3cfg = small(cfg, "wat_extract.paths_base=s3://cc-wat/",
                  f"storage.storage_options.client_kwargs={{endpoint_url: '{endpoint}'}}",
                  "storage.storage_options.key=testing", "storage.storage_options.secret=testing")
    out = str(tmp_path / "pairs")
    stats = wat_extract.run(spark, s3cfg, stage_args("--paths-file", "s3://cc-wat/wat.paths", "--output", out))
    assert stats["files"] == {"total": 1, "ok": 1, "partial": 0, "failed": 0}
    assert stats["pairs_kept_by_crawl"] == {"CC-MAIN-2024-10": len(summary.pairs)}
    got = Counter((r.url, r.text) for r in spark.read.parquet(out).collect())
    assert got == Counter(summary.pairs)
    assert Counter(stats["rejected_by_reason"]) == summary.link_rejects


def test_user_errors_are_input_or_config_errors(cfg, tmp_path):
    with pytest.raises(datasets.InputError, match="--input"):
        wat_extract.resolve_inputs(cfg, stage_args("--output", "x"), {})
    with pytest.raises(datasets.InputError, match="matches no file"):
        wat_extract.resolve_inputs(cfg, stage_args("--input", str(tmp_path / "*.wat.gz"), "--output", "x"), {})
    with pytest.raises(datasets.InputError, match="paths file not found"):
        wat_extract.resolve_inputs(cfg, stage_args("--paths-file", str(tmp_path / "p.gz"), "--output", "x"), {})
    (tmp_path / "bad.paths.gz").write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip")
    with pytest.raises(datasets.InputError, match="cannot read paths file"):
        wat_extract.resolve_inputs(cfg, stage_args("--paths-file", str(tmp_path / "bad.paths.gz"),
                                                   "--output", "x"), {})
    (tmp_path / "d").mkdir()
    for name in ("b.warc.wat.gz", "a.warc.wat.gz", ".hidden", "_SUCCESS"):
        (tmp_path / "d" / name).write_bytes(b"")
    listed = wat_extract.resolve_inputs(cfg, stage_args("--input", str(tmp_path / "d"), "--output", "x"), {})
    assert listed == [str(tmp_path / "d" / "a.warc.wat.gz"), str(tmp_path / "d" / "b.warc.wat.gz")]
    with pytest.raises(ConfigError, match="reader"):
        wat_extract.run(None, cfg.with_overrides(["wat_extract.reader=nope"]),
                        stage_args("--input", "x", "--output", "y"))


def test_spark_submit_entry_point_shows_help():
    proc = subprocess.run([sys.executable, str(REPO / "spark_jobs" / "wat_extract.py"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "--paths-file" in proc.stdout and "--rejected-output" in proc.stdout and "--format" in proc.stdout


@pytest.mark.slow
def test_real_archives_stage_run_accounts_for_every_record(spark, cfg, tmp_path):
    """The six real archives and the whirlwind WARC in one `--format warc` run: every file ok,
    every record read (by type, warcio's count) and the pairs of the independent reader."""
    from tests.gen import warc_quirks as wq
    from tests.test_real_archives import ALL_FILES, reference

    files = [p for p in ALL_FILES if p.name != "whirlwind.warc.wat.gz"]
    quirks = wq.quirk_files(tmp_path / "quirks")
    out = str(tmp_path / "pairs")
    args = stage_args("--format", "warc", "--input", *map(str, files), quirks["garbage_gz"].path,
                      quirks["arc_gz"].path, "--output", out)
    stats = wat_extract.run(spark, small(cfg), args)
    refs = [reference(p, "warc") for p in files]
    types = sum((r["types"] for r in refs), Counter()) + Counter({"warcinfo": 2, "response": 7})
    assert stats["files"] == {"total": len(files) + 2, "ok": len(files) + 1, "partial": 1, "failed": 0}
    assert stats["records_by_type"] == dict(sorted(types.items()))
    assert stats["records_accounted"] is True and stats["records_read"] == sum(types.values())
    assert stats["records_lost"] == 1 and stats["lost_reasons"] == {"bad_gzip_member": 1}
    assert stats["lost_in_rejected"] == 1 and stats["rejected_by_reason"]["bad_gzip_member"] == 1
    expected = sum((r["kept"] for r in refs), Counter()) + Counter(quirks["garbage_gz"].pairs) \
        + Counter(quirks["arc_gz"].pairs)
    got = Counter((r.url, r.text) for r in spark.read.parquet(out).select("url", "text").collect())
    assert got == expected
    assert stats["quirks"]["angle_bracket_uri"] == 15
    outcomes = spark.read.parquet(datasets.stats_path(out, "file_outcomes")).collect()
    partial = [o for o in outcomes if o.status == "partial"]
    assert len(partial) == 1 and partial[0].error_message.startswith("bad_gzip_member")
    assert all(sum(o.records_by_type.values()) == o.records_read for o in outcomes)


@pytest.mark.slow
def test_damaged_records_are_rejected_rows_and_the_stats_balance(spark, cfg, tmp_path):
    """Records read despite a lying Content-Length (2 in each synthetic lying-length file, 1 in
    warcio's example-trunc.warc) are bad_record rows of the rejected dataset; with a lost gzip
    member beside them, kept + rejected rows equal the input units the file outcomes count."""
    from tests.gen import warc_quirks as wq

    quirks = wq.quirk_files(tmp_path / "quirks")
    trunc = REPO / "tests" / "fixtures" / "warcio" / "example-trunc.warc"
    out = str(tmp_path / "pairs")
    args = stage_args("--format", "warc", "--input", quirks["lying_length"].path,
                      quirks["lying_length_gz"].path, quirks["garbage_gz"].path, str(trunc),
                      "--output", out)
    stats = wat_extract.run(spark, small(cfg), args)
    assert stats["records_damaged"] == 5 and stats["damaged_in_rejected"] == 5
    assert stats["damage_reasons"] == {"content_length_mismatch": 5}
    assert stats["records_lost"] == 1 and stats["lost_in_rejected"] == 1
    assert stats["balanced"] is True
    assert stats["output_rows"] + stats["rejected_rows"] == stats["input_rows"]
    bad = spark.read.parquet(datasets.rejected_path(out)).where("status = 'bad_record'").collect()
    assert len(bad) == 5 and all(r.level == "record" and r.record_id for r in bad)
    assert sorted(r.page_url for r in bad if "lying-length" in r.source_file) == sorted(
        ["https://www.example.org/dir/page21.html", "https://www.example.org/dir/page23.html"] * 2)
    outcomes = spark.read.parquet(datasets.stats_path(out, "file_outcomes")).collect()
    assert sorted(o.records_damaged for o in outcomes) == [0, 1, 2, 2]
