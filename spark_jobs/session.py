"""The one place a SparkSession is obtained.

On EMR, Dataproc and Databricks the session (and its master, memory and GPU settings) belongs to
the cluster, so an active session is reused as it is. Only when `spark.master` is set (the local
profile, tests) is a session built here.
"""

from __future__ import annotations

import logging
import os
import sys

from spark_jobs.config import Config

log = logging.getLogger(__name__)


def get_spark(cfg: Config, app_name: str | None = None):
    """The active session, else a new one named `<spark.app_name>-<app_name>`."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    prefix = cfg.get("spark.app_name") or "clipcrawl"
    builder = SparkSession.builder.appName(f"{prefix}-{app_name}" if app_name else prefix)
    master = cfg.get("spark.master")
    if master:
        builder = builder.master(master)
        # Local Python workers must run the interpreter that has our dependencies (the venv),
        # not whatever `python3` is first on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    for key, value in (cfg.get("spark.conf") or {}).items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark session %s (master=%s, version=%s)", spark.sparkContext.appName,
             spark.sparkContext.master, spark.version)
    return spark
