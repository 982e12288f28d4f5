"""The Databricks notebook's cells, executed from its source against the Spark Connect fixture (the
session kind Databricks serverless and standard access mode give a notebook).

The source is split at `# COMMAND ----------` and each cell is exec'd in order in one namespace, as
Databricks runs them, with `spark` a Spark Connect session and a stand-in `dbutils` whose widgets
return this test's root, paths list and config. `# MAGIC` lines (markdown, the `%pip install`)
are comments to Python: the package comes from PYTHONPATH here. To keep the suite's time down the
root is seeded with the local run's wat-extract and dedup outputs, so those two cells show the
notebook's resume path (skipped: complete), and the download to build-index cells run over
Connect; tests/test_connect.py runs every stage, wat-extract included, over Connect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spark_jobs.run import STAGE_NAMES
from tests import spark_daemons
from tests.run_outputs import pipeline_outputs

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "clipcrawl_databricks.py"
pytestmark = pytest.mark.slow

RUNNER = r'''
import json, sys
from pyspark.sql import SparkSession

url, notebook, values_json = sys.argv[1:4]
values = json.loads(values_json)


class Widgets:
    def __init__(self):
        self.defaults = {}

    def text(self, name, default, label=None):
        self.defaults[name] = default

    def get(self, name):
        return values.get(name, self.defaults[name])


class DbUtils:
    widgets = Widgets()


spark = SparkSession.builder.remote(url).getOrCreate()
namespace = {"__name__": "__main__", "spark": spark, "dbutils": DbUtils()}
cells = open(notebook, encoding="utf-8").read().split("# COMMAND ----------")
for number, cell in enumerate(cells, 1):
    exec(compile(cell, f"{notebook} (cell {number})", "exec"), namespace)
print(json.dumps({"cells": len(cells), "connect": type(spark).__module__,
                  "widgets": sorted(DbUtils.widgets.defaults)}))
'''


def test_notebook_cells_run_over_spark_connect(connect_server, local_demo_run, tmp_path):
    local = local_demo_run
    root = tmp_path / "run"
    for stage in ("wat-extract", "dedup"):
        name = local["cfg"].get(f"run.datasets.{stage}")
        spark_daemons.copy_dataset(local["root"] / name, root / name)
    cfg = local["cfg"].with_overrides([f"storage.root={root}", f"dedup.seen={root / '_filters' / 'seen_pairs'}"])
    config = tmp_path / "notebook.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    paths = tmp_path / "wat.paths"
    paths.write_text("\n".join(cfg.get("run.input")) + "\n")
    values = {"root": str(root), "paths_file": str(paths), "config": str(config)}

    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", RUNNER, connect_server.url, str(NOTEBOOK), json.dumps(values)],
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"cells": NOTEBOOK.read_text().count("# COMMAND ----------") + 1,
                   "connect": "pyspark.sql.connect.session", "widgets": ["config", "paths_file", "root"]}
    printed = [line for line in proc.stdout.splitlines() if line.split(":")[0] in STAGE_NAMES]
    # the two seeded stages resume as complete; every later stage of the chain runs
    assert [line.split(":")[1].split()[0] for line in printed] == ["skipped"] * 2 + ["ran"] * (len(STAGE_NAMES) - 2)

    # from download on: the seeded stages' outputs are the local run's own files
    ours, reference = pipeline_outputs(root, cfg, "download"), pipeline_outputs(local["root"], local["cfg"], "download")
    assert ours["subsets"], "the sample should keep some pairs"
    for name in reference:
        assert ours[name] == reference[name], name
