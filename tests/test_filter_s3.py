"""The filter's non-Spark IO on S3 (moto on loopback): a safety head read from s3:// and an
embeddings part of the clip-retrieval layout written to s3:// and read back row-aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from udfs.clip import embeddings
from udfs.filter import safety_heads, subset_filter

HEADS = Path(__file__).resolve().parent / "fixtures" / "safety_head"


@pytest.fixture
def s3_bucket(moto_s3):
    moto_s3.bucket("laion")
    return moto_s3.client, moto_s3.options

def test_safety_head_from_s3(s3_bucket):
    client, options = s3_bucket
    client.put_object(Bucket="laion", Key="heads/linear_d32.npz", Body=(HEADS / "linear_d32.npz").read_bytes())
    head = safety_heads.get_head("s3://laion/heads/linear_d32.npz", options)
    local = safety_heads.load_head(str(HEADS / "linear_d32.npz"))
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_array_equal(head.predict(x), local.predict(x))
    with pytest.raises(safety_heads.HeadLoadError, match="not found"):
        safety_heads.load_head("s3://laion/heads/missing.npz", storage_options=options)


def test_embedding_part_on_s3(s3_bucket):
    _, options = s3_bucket
    rng = np.random.default_rng(1)
    img = rng.standard_normal((4, 8)).astype(np.float16)
    txt = rng.standard_normal((4, 8)).astype(np.float16)
    pdf = pd.DataFrame({"SAMPLE_ID": [10, -3, 7, 2], "URL": list("abcd"), "TEXT": list("wxyz"),
                        "similarity": [0.3, 0.4, 0.5, 0.6], "LANGUAGE": ["en", None, "de", "fr"],
                        "punsafe": [None, 0.1, None, 0.2], "pwatermark": [None] * 4,
                        "key": ["k0", "k1", "k2", "k3"], "tar_path": ["s3://laion/images/00000.tar"] * 4,
                        "image_embedding": embeddings.encode_rows(img),
                        "text_embedding": embeddings.encode_rows(txt)})
    root = "s3://laion/dataset/embeddings/laion2B-multi"
    assert subset_filter.write_embedding_part(root, 3, pdf, options) == 4
    got_img, got_txt, meta = embeddings.read_retrieval(root, options)
    np.testing.assert_array_equal(got_img, img)
    np.testing.assert_array_equal(got_txt, txt)
    assert list(meta["SAMPLE_ID"]) == [10, -3, 7, 2] and list(meta.columns) == list(
        subset_filter.EMBEDDING_METADATA_COLUMNS)
    assert embeddings.list_retrieval_parts(root, options) == [3]
