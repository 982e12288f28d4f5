"""Shared fixtures. One local[2] SparkSession serves the whole suite (it takes ~10 s to start)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
TEST_FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def cfg():
    """The local profile with test-sized Spark settings. `local[2,2]`: two cores, and a failed task
    is retried once, as on a cluster (tests/test_resilience.py injects such a failure)."""
    from spark_jobs.config import load_config

    return load_config("local", overrides=[
        "spark.master=local[2,2]",
        "spark.conf.spark.sql.shuffle.partitions=4",
        "spark.conf.spark.driver.memory=2g",
        "spark.conf.spark.ui.enabled=false",
        "spark.conf.spark.ui.showConsoleProgress=false",
    ])


@pytest.fixture(scope="session")
def spark(cfg):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from spark_jobs.session import get_spark

    session = get_spark(cfg, "clipcrawl-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def commoncrawl_fixtures() -> Path:
    """The real Common Crawl files (WARC/WAT/WET of one page): ../shared, or a copy in tests/."""
    for folder in (SHARED_FIXTURES / "commoncrawl", TEST_FIXTURES / "commoncrawl"):
        if (folder / "whirlwind.warc.gz").exists():
            return folder
    pytest.fail("real Common Crawl fixtures not found in ../shared/fixtures or tests/fixtures")
