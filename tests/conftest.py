"""Shared fixtures. One local[2] SparkSession serves the whole suite (it takes ~10 s to start)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
TEST_FIXTURES = Path(__file__).resolve().parent / "fixtures"


# Under pytest-xdist (`make test`: two workers, `--dist loadfile --no-loadscope-reorder`) each test
# module runs whole on one worker, so its module fixtures (a pipeline run, a server) are built once,
# and modules are handed out in this order: the longest first (measured), so no long one is left
# for the end. (xdist's `loadgroup` cannot merge modules here: pytest 9 ignores the node ids it rewrites.)
LONG_MODULES = ("test_pipeline_e2e", "test_cluster", "test_connect", "test_notebook", "test_image_dedup",
                "test_takedown", "test_export", "test_knn", "test_clip_score_stage", "test_dedup")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        stem = Path(item.nodeid.split("::", 1)[0]).stem
        return LONG_MODULES.index(stem) if stem in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)   # stable: each module keeps its own order and stays contiguous


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


# --- the demo sample, one local run of it, and Spark's own servers --------------------------------
# (tests/test_cluster.py, test_connect.py, test_notebook.py compare their runs with this local one)

DEMO_IMAGES = 24
DEMO_OVERRIDES = [
    "download.shard_size=6",          # several shards, so shards land on both workers
    "download.thread_count=4",
    "clip.batch_size=8",
]


@pytest.fixture(scope="session")
def demo_server():
    from tests.gen.image_server import ImageServer

    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def demo_sample(demo_server, tmp_path_factory):
    from demo.sample import build_sample

    return build_sample(demo_server, tmp_path_factory.mktemp("demo_sample"), n_images=DEMO_IMAGES,
                        n_files=2, seed=11)


def demo_run_config(root: Path, sample: dict, extra=()):
    """The demo's config (local profile, tiny CLIP preset) at test size."""
    from demo.__main__ import demo_config

    return demo_config(root, sample["wat_files"], [*DEMO_OVERRIDES, *extra])


def run_chain(spark, cfg, force=()) -> dict:
    """`clipcrawl run` from wat-extract to build-index on `cfg` (the whole chain the tests compare)."""
    import argparse

    from spark_jobs import run as pipeline

    return pipeline.run(spark, cfg, argparse.Namespace(input=None, paths_file=None, root=None,
                                                       from_stage="wat-extract", to_stage="build-index",
                                                       force=list(force)))


@pytest.fixture(scope="session")
def local_demo_run(spark, demo_sample, tmp_path_factory):
    """`clipcrawl run` of the demo sample in local[*] (the suite's session): the reference."""
    root = tmp_path_factory.mktemp("local_demo_run") / "run"
    cfg = demo_run_config(root, demo_sample)
    summary = run_chain(spark, cfg)
    assert all(s["status"] == "ran" for s in summary["stages"].values()), summary
    return {"root": root, "cfg": cfg}


@pytest.fixture(scope="session")
def connect_server(tmp_path_factory):
    """The Spark Connect server shipped inside pyspark (local mode, 127.0.0.1, a free port). Its
    Python workers import this checkout (PYTHONPATH), as a cluster's would import the installed
    wheel. Stopped at the end of the session, also when its start fails."""
    from tests.spark_daemons import ConnectServer

    server = ConnectServer(tmp_path_factory.mktemp("connect_server"), pythonpath=str(REPO))
    server.start()
    try:
        yield server
    finally:
        server.stop()
