"""Indices written to and served from s3:// (a moto server on 127.0.0.1), through udfs.fsio, and
thumbnails read from a shard on s3 with ranged reads."""

from __future__ import annotations

import pytest
from PIL import Image

from serving.thumbnails import ThumbnailReader
from tests.gen.embeddings_layout import write_random_subset, write_tar
from udfs import fsio
from udfs.index import build, search, tuning


@pytest.fixture(scope="module")
def s3():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket="laion")
    yield {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


def test_build_to_s3_and_search_from_s3(tmp_path, s3):
    root, image, _ = write_random_subset(tmp_path / "dataset", n=300, dim=8, parts=2)
    infos = build.build_subset(str(root), "s3://laion/indices/laion2B-en", tuning.BuildParams(recall_sample=30),
                             storage_options=s3)
    assert infos["status"] == "ok"
    for name in ("image.index", "text.index", "ids.parquet", "index_infos.json"):
        assert fsio.exists(f"s3://laion/indices/laion2B-en/{name}", s3), name
    assert not fsio.exists("s3://laion/indices/laion2B-en/ids.parquet.tmp", s3)
    indices = search.open_indices("s3://laion/indices", cache_dir=str(tmp_path / "cache"), storage_options=s3)
    top = indices["laion2B-en"].search(image[250], "image", 1)[0]
    assert top["URL"].endswith("/250.jpg")


def test_thumbnail_from_a_shard_on_s3(tmp_path, s3):
    local = write_tar(tmp_path / "00000.tar", [Image.new("RGB", (8, 8), (0, 0, 255))] * 3, ["a", "b", "c"])
    fs, _ = fsio.filesystem("s3://laion/images/00000.tar", s3)
    fs.put_file(local, "laion/images/00000.tar")
    reader = ThumbnailReader(2, s3)
    data, ctype = reader.read("s3://laion/images/00000.tar", "000000002")
    assert ctype == "image/jpeg" and data[:2] == b"\xff\xd8"
    assert reader.read("s3://laion/images/00000.tar", "000000009") is None
    assert reader.read("s3://laion/images/missing.tar", "000000000") is None
