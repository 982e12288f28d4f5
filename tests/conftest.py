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

    session = get_spark(cfg, "tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def commoncrawl_fixtures() -> Path:
    """The real Common Crawl files (WARC/WAT/WET of one page): ../shared, or a copy in tests/."""
    for folder in (SHARED_FIXTURES / "commoncrawl", TEST_FIXTURES / "commoncrawl"):
        if (folder / "whirlwind.warc.gz").exists():
            return folder
    pytest.fail("real Common Crawl fixtures not found in ../shared/fixtures or tests/fixtures")


class MotoS3:
    """A moto S3 server on 127.0.0.1: `options` is what fsspec/s3fs (and our config's
    storage.storage_options) needs, `client` a boto3 client for setting up objects."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str) -> str:
        """Create `name`, or empty it if an earlier test left objects in it (and drop s3fs's cached
        instances, whose directory listings would still show the old objects)."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    self.client.delete_object(Bucket=name, Key=obj["Key"])
        return name


@pytest.fixture(scope="session")
def moto_s3():
    """One moto S3 server for the suite (loopback only). AWS_* variables are set to dummies so
    that code building its own boto/s3fs clients never looks for real credentials."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}.items():
        mp.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield MotoS3(f"http://{host}:{port}")
    server.stop()
    mp.undo()
