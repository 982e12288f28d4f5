"""The filter on REAL scores: the bundled tiny CLIP model (tests/fixtures/tiny_clip) scores shapes drawn
by tests/gen/shapes.py with matching and mismatched captions, and the filter, with the thresholds of
conf/presets/tiny_clip.yaml, keeps the matching pairs and drops the mismatched ones."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from spark_jobs import filter as filter_stage
from spark_jobs.config import load_config
from tests.conftest import REPO
from udfs.ids import pair_uid

PRESET = REPO / "conf" / "presets" / "tiny_clip.yaml"
MODEL = REPO / "tests" / "fixtures" / "tiny_clip"

# (color, shape, caption language, variant) of the images; each is paired with its own caption and
# with the caption of a different colour AND shape.
CASES = [("red", "circle", "en", 0), ("blue", "star", "de", 0), ("green", "triangle", "fr", 0),
         ("yellow", "square", "en", 1)]
MISMATCH = {"red": "blue", "blue": "yellow", "green": "red", "yellow": "green",
            "circle": "square", "star": "triangle", "triangle": "circle", "square": "star"}


@pytest.mark.slow
def test_filter_keeps_matching_and_drops_mismatched_with_tiny_clip(spark, tmp_path):
    from tests.gen.shapes import caption, draw_shape
    from tests.test_filter import make_scored_from_records
    from udfs.clip import embeddings
    from udfs.clip.clip_model import load_clip

    model = load_clip(f"local-dir:{MODEL}", None, device="cpu")
    images = [draw_shape(c, s, size=64, rng=np.random.default_rng(i)) for i, (c, s, _, _) in enumerate(CASES)]
    img = model.encode_images(images)
    records = []
    for i, (color, shape, lang, variant) in enumerate(CASES):
        for kind, text in (("match", caption(color, shape, lang, variant)),
                           ("mismatch", caption(MISMATCH[color], MISMATCH[shape], lang, variant))):
            txt = model.encode_texts([text])[0]
            url = f"http://127.0.0.1/img/{i}.jpg"
            records.append({"uid": pair_uid(url, text), "key": f"00000{i:04d}", "url": url, "text": text,
                            "status": "success", "similarity": float(img[i] @ txt),
                            "image_embedding": embeddings.encode(img[i]),
                            "text_embedding": embeddings.encode(txt), "kind": kind})
    scored = tmp_path / "scored"
    make_scored_from_records(scored, records)

    c = load_config("local", str(PRESET))  # the Spark session already exists: only filter.* matters
    stats = filter_stage.run(spark, c, argparse.Namespace(input=str(scored), output=str(tmp_path / "ds"),
                                                          rejected_output=None))
    kept = pd.concat([spark.read.parquet(str(tmp_path / "ds" / name)).toPandas()
                      for name in c.get("filter.subsets").values()])
    rejected = spark.read.parquet(str(tmp_path / "ds") + "_rejected").toPandas()
    want_kept = sorted(r["text"] for r in records if r["kind"] == "match")
    want_dropped = sorted(r["text"] for r in records if r["kind"] == "mismatch")
    assert sorted(kept["TEXT"]) == want_kept, (stats["thresholds"], [(r["text"], r["similarity"]) for r in records])
    assert sorted(rejected["text"]) == want_dropped
    assert set(rejected["status"]) == {"below_threshold"}
    assert stats["balanced"] and stats["kept"] == len(CASES)

