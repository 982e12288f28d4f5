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


def lighten_numpy_converters() -> list[str]:
    """Keep PySpark's py4j numpy converters from importing pandas and pyarrow into the driver.

    PySpark 4's NumpyScalarConverter / NumpyArrayConverter run `can_convert` on every py4j call
    argument, and it imports `pyspark.testing.utils` just to read `have_numpy` (is numpy
    installed?); that module imports pandas and pyarrow. The first py4j call (SparkConf in
    SparkContext's start) therefore costs every driver ~85 MB of RSS (129 -> 43 MB measured on a
    download run's driver). The replacement answers the same question without the import: an
    object can only be a numpy array or scalar if numpy is already imported. Only the versions
    that read `have_numpy` are patched; returns the names of the classes changed.
    """
    from pyspark.sql import types

    def can_convert_scalar(self, obj) -> bool:
        np = sys.modules.get("numpy")
        return np is not None and isinstance(obj, np.generic)

    def can_convert_array(self, obj) -> bool:
        np = sys.modules.get("numpy")
        return np is not None and isinstance(obj, np.ndarray) and obj.ndim == 1

    changed = []
    for name, replacement in (("NumpyScalarConverter", can_convert_scalar),
                              ("NumpyArrayConverter", can_convert_array)):
        cls = getattr(types, name, None)
        current = getattr(cls, "can_convert", None)
        if current is not None and "have_numpy" in current.__code__.co_names:
            cls.can_convert = replacement
            changed.append(name)
    return changed


def get_spark(cfg: Config, app_name: str | None = None):
    """The active session, else a new one named `<spark.app_name>-<app_name>`."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    lighten_numpy_converters()

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
