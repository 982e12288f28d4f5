"""The pipeline runner's pure parts, `make package`, the Databricks notebook and the config layer."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

from spark_jobs.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_profiles_load_and_set_overrides_keep_types():
    for profile in ("local", "emr", "dataproc", "databricks"):
        cfg = load_config(profile)
        assert cfg.get("filter.thresholds.en") == pytest.approx(0.28)
    cfg = load_config("local", overrides=["download.image_size=384", "download.allowed_cidrs=127.0.0.0/8",
                                          "spark.conf.spark.sql.shuffle.partitions=3"])
    assert cfg.get("download.image_size") == 384
    assert cfg.get("download.allowed_cidrs") == "127.0.0.0/8"
    assert cfg.get("spark.conf")["spark.sql.shuffle.partitions"] == 3


def test_unknown_keys_and_profiles_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'download.thread_cont'"):
        load_config("local", overrides=["download.thread_cont=8"])
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("laptop")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip:\n  modle: ViT-B-32\n")
    with pytest.raises(ConfigError, match="clip.modle"):
        load_config("local", config_file=str(bad))


def test_cluster_profiles_schedule_gpus_for_clip_score():
    for profile in ("emr", "dataproc"):
        conf = load_config(profile).get("spark.conf")
        assert float(conf["spark.task.resource.gpu.amount"]) > 0
        assert conf["spark.executor.resource.gpu.discoveryScript"].endswith("get_gpus_resources.sh")
    assert (REPO / "conf/gpu/get_gpus_resources.sh").stat().st_mode & 0o111


def test_run_selects_stage_ranges_and_builds_stage_inputs():
    from spark_jobs import run

    names = [s.name for s in run.selected_stages("dedup", "clip-score")]
    assert names == ["dedup", "download", "image-dedup", "clip-score"]
    with pytest.raises(ConfigError):
        run.selected_stages("filter", "dedup")
    cfg = load_config("local")
    args = argparse.Namespace(input=["a.wat.gz"], paths_file=None)
    first = run.stage_argv(cfg, args, "/r", run.PIPELINE[0])
    assert first == ["--output", "/r/wat_pairs", "--input", "a.wat.gz"]
    assert run.stage_argv(cfg, args, "/r", run.PIPELINE[3]) == ["--input", "/r/images", "--output", "/r/images_dedup"]
    assert run.stage_argv(cfg, args, "/r", run.PIPELINE[4]) == ["--input", "/r/images_dedup", "--output", "/r/scored"]
    with pytest.raises(ConfigError, match="no crawl input"):
        run.stage_argv(cfg, argparse.Namespace(input=None, paths_file=None), "/r", run.PIPELINE[0])


def test_databricks_notebook_parses_and_imports():
    source = (REPO / "notebooks/clipcrawl_databricks.py").read_text()
    assert source.startswith("# Databricks notebook source")
    assert source.count("# COMMAND ----------") >= 6
    ast.parse(source)
    spec = importlib.util.spec_from_file_location("clipcrawl_notebook", REPO / "notebooks/clipcrawl_databricks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # outside Databricks no stage runs; the imports must resolve
    assert callable(module.run_cell)
    assert module.cfg.profile == "databricks"


def test_package_builds_pyfiles_zip_with_conf(tmp_path):
    from spark_jobs import package

    result = package.build(tmp_path)
    with zipfile.ZipFile(result["zip"]) as zf:
        names = set(zf.namelist())
    assert "spark_jobs/conf/base.yaml" in names and "spark_jobs/cli.py" in names and "udfs/ids.py" in names
    assert all(Path(p).exists() for p in result["entry_scripts"])
    listed = [ln.split("#")[0].strip() for ln in (tmp_path / "requirements-cluster.txt").read_text().splitlines()]
    names = {ln.split("=")[0].split(">")[0].split("<")[0].lower() for ln in listed if ln}
    assert {"fastwarc", "orjson", "pyyaml", "open_clip_torch", "faiss-cpu"} <= names
    assert "pyspark" not in names   # the cluster's own Spark provides it


def test_numpy_arguments_still_reach_the_jvm(spark):
    """The session's lighter numpy converters convert numpy scalars and 1-d arrays as before."""
    import numpy as np
    from pyspark.sql import types

    assert "have_numpy" not in types.NumpyArrayConverter.can_convert.__code__.co_names
    jvm = spark.sparkContext._jvm
    assert jvm.java.lang.String.valueOf(np.int32(3)) == "3"   # not an int subclass: converted
    assert jvm.java.util.Arrays.toString(np.array([3, 4], dtype=np.int64)) == "[3, 4]"
    assert not types.NumpyArrayConverter().can_convert(np.zeros((2, 2)))


@pytest.mark.slow
def test_fresh_driver_does_not_import_pandas_or_pyarrow(tmp_path):
    """A driver that starts a session and runs an RDD job stays free of pandas and pyarrow
    (PySpark's py4j converters would import both, ~85 MB)."""
    import subprocess
    import sys

    code = """if True:
        import json, sys
        from spark_jobs.config import load_config
        from spark_jobs.session import get_spark
        spark = get_spark(load_config("local").with_overrides(["spark.master=local[1]"]), "probe")
        total = spark.sparkContext.parallelize(range(10), 2).mapPartitions(lambda it: [sum(it)]).sum()
        # the download stage's DataFrame plan and per-shard UDF keep the driver light too (loopback
        # URLs are refused by the address guard before any connection)
        import argparse, sys as _sys
        from spark_jobs import download
        inp, out = _sys.argv[1] + "/in", _sys.argv[1] + "/out"
        spark.range(3).selectExpr("concat('http://127.0.0.1:9/', id) AS url", "'a caption' AS text").write.parquet(inp)
        cfg = load_config("local").with_overrides(["download.shard_size=2"])
        stats = download.run(spark, cfg, argparse.Namespace(input=inp, output=out, retry_failed=None))
        print(json.dumps({"total": total, "download": stats["status_counts"], "shards": stats["shards_written"],
                          "pandas": "pandas" in sys.modules, "pyarrow": "pyarrow" in sys.modules}))
        spark.stop()"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"total": 45, "download": {"blocked_address": 3}, "shards": 2, "pandas": False, "pyarrow": False}
