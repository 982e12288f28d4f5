"""Every stage over Spark Connect: `clipcrawl run` of the demo sample with SPARK_REMOTE pointing at
the Connect server that ships inside pyspark (tests/conftest.py `connect_server`), wat-extract to
build-index, gives the same data as the local run (`local_demo_run`). Plus the session layer's
Connect-specific parts, and the rule that no stage uses SparkContext / RDD / py4j APIs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spark_jobs.run import STAGE_NAMES
from tests.run_outputs import pipeline_outputs

REPO = Path(__file__).resolve().parent.parent

# APIs Spark Connect does not have (ARCHITECTURE.md's rule for stages).
NOT_IN_CONNECT = re.compile(r"\.sparkContext\b|\.rdd\b|\b_jvm\b|\b_jsc\b|\b_jdf\b|\bparallelize\(|"
                            r"\bbroadcast\(\s*[^)]|\baccumulator\(|mapPartitionsWithIndex|\bpartitionBy\(\s*\d")


def write_run_config(cfg, path: Path) -> Path:
    """The resolved config of a run as a --config file, so a CLI run gets exactly the same settings."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    return path


def test_stages_use_only_connect_compatible_apis():
    """The rule in ARCHITECTURE.md, checked on the code: outside session.py (which guards its
    classic-only calls with is_connect), no stage module touches SparkContext, RDDs or py4j.
    F.broadcast(df) (a join hint) is a DataFrame API and stays allowed."""
    offenders = []
    for path in sorted((REPO / "spark_jobs").glob("*.py")):
        if path.name == "session.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if NOT_IN_CONNECT.search(code) and "F.broadcast(" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_remote_url_from_config_or_environment(monkeypatch):
    from spark_jobs.config import load_config
    from spark_jobs.session import remote_url

    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    assert remote_url(load_config("local")) is None
    monkeypatch.setenv("SPARK_REMOTE", "sc://127.0.0.1:15002")
    assert remote_url(load_config("local")) == "sc://127.0.0.1:15002"
    assert remote_url(load_config("local", overrides=["spark.remote=sc://127.0.0.1:1"])) == "sc://127.0.0.1:1"


def test_arrow_batches_by_rows_lifts_the_byte_limit_and_keeps_a_users(spark):
    """Inside, Arrow batches to Python are cut by rows only (Spark's "no limit" value); after, the
    setting is unset again; a limit the user set is left as it is."""
    from spark_jobs import session

    key = session.ARROW_MAX_BYTES
    assert spark.conf.get(key, None) is None
    with session.arrow_batches_by_rows(spark):
        assert spark.conf.get(key) == str(2 ** 31 - 1)
        assert spark.range(3).count() == 3
    assert spark.conf.get(key, None) is None
    spark.conf.set(key, "1m")
    try:
        with session.arrow_batches_by_rows(spark):
            assert spark.conf.get(key) == "1m"
        assert spark.conf.get(key) == "1m"
    finally:
        spark.conf.unset(key)


@pytest.mark.slow
def test_get_spark_gives_a_connect_session(connect_server, tmp_path):
    """spark.remote makes get_spark return a Connect session (in a fresh process: Connect mode
    is process-wide in pyspark); job tags work on it and static settings are not sent."""
    code = f"""if True:
        import json, sys
        from spark_jobs.config import load_config
        from spark_jobs import session
        cfg = load_config("local", overrides=["spark.remote={connect_server.url}"])
        spark = session.get_spark(cfg, "probe")
        with session.stage_jobs(spark, "probe"):
            n = spark.range(7).count()
            tags = sorted(spark.getTags())   # a live set under Connect: copy it
        with session.arrow_batches_by_rows(spark):
            inside = spark.conf.get(session.ARROW_MAX_BYTES)
        arrow = [inside, spark.conf.get(session.ARROW_MAX_BYTES, None)]
        print(json.dumps({{"connect": session.is_connect(spark), "module": type(spark).__module__,
                          "n": n, "tags": tags, "after": sorted(spark.getTags()), "arrow": arrow,
                          "pyspark_classic_context": "pyspark.core.context" in sys.modules
                          and sys.modules["pyspark.core.context"].SparkContext._active_spark_context is not None}}))
        spark.stop()"""
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"connect": True, "module": "pyspark.sql.connect.session", "n": 7,
                   "tags": ["clipcrawl-probe"], "after": [], "arrow": ["2147483647", None],
                   "pyspark_classic_context": False}
    assert "CANNOT_MODIFY_CONFIG" not in proc.stderr   # driver memory etc. stay the server's


@pytest.mark.slow
def test_clipcrawl_run_over_connect_equals_local_run(connect_server, local_demo_run, spark, tmp_path):
    local = local_demo_run
    root = tmp_path / "run"
    # the same settings as the local run, with this run's own root and seen-pairs filter
    # ... and the en subset exported at the end, as `run.export` does (mapInArrow, applyInArrow and
    # repartitionById over Connect)
    en = local["cfg"].get("filter.subsets.en")
    cfg = local["cfg"].with_overrides([f"storage.root={root}", f"dedup.seen={root / '_filters' / 'seen_pairs'}",
                                       f"run.export=[{en}]"])
    config = write_run_config(cfg, tmp_path / "run.yaml")
    env = {k: v for k, v in os.environ.items() if k != "SPARK_CONNECT_MODE_ENABLED"}
    env.update(SPARK_REMOTE=connect_server.url, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "spark_jobs.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"spark connect session at {connect_server.url}" in proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert {s: v["status"] for s, v in summary["stages"].items()} == {s: "ran" for s in STAGE_NAMES}

    ours, reference = pipeline_outputs(root, cfg), pipeline_outputs(local["root"], local["cfg"])
    assert ours["subsets"], "the sample should keep some pairs"
    for name in reference:
        assert ours[name] == reference[name], name
    assert summary["exports"][en]["status"] == "ran", summary["exports"]
    assert_same_export(spark, root / cfg.get("run.datasets.export") / en, local, en, tmp_path / "local_export")


def _samples(folder: Path) -> list[list[tuple]]:
    """Each shard of an export as its members in order: (name, bytes), KEY.json parsed, with
    similarity to 4 places (the scores match the local run's to 4 places, see pipeline_outputs)."""
    import tarfile

    shards = []
    for tar_path in sorted(folder.glob("*.tar")):
        members = []
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    meta["similarity"] = round(meta["similarity"], 4)
                    data = meta
                members.append((m.name, data))
        shards.append(members)
    return shards


def assert_same_export(spark, ours: Path, local: dict, subset: str, local_out: Path) -> None:
    """The Connect run's export holds the same samples, in the same shards and order, as a
    local[*] export of the local run's subset with the same settings."""
    import argparse

    from spark_jobs import export

    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    stats = export.run(spark, local["cfg"], parser.parse_args([
        "--dataset", str(local["root"] / local["cfg"].get("run.datasets.filter")), "--subset", subset,
        "--output", str(local_out)]))
    assert stats["output_rows"] > 0 and stats["balanced"], stats
    assert json.loads((ours / "sizes.json").read_text()) == json.loads((local_out / "sizes.json").read_text())
    assert _samples(ours) == _samples(local_out)
