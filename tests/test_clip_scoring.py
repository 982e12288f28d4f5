"""udfs.clip.clip_scoring without Spark: batching edge cases, decode failures, samples missing from
the tar, pass-through statuses, and matching vs mismatching captions on tests/gen/shapes.py images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.gen.image_shards import Row, mixed_rows, write_images_folder
from udfs.clip import clip_model, clip_scoring, embeddings
from udfs.download import shard_writer

TINY_SPEC = "local-dir:tests/fixtures/tiny_clip"


@pytest.fixture(scope="module")
def tiny():
    return clip_model.load_clip(TINY_SPEC, None, device="cpu")


def _score(tmp_path, shards, tiny, batch_size=4, prefetch=2, multi=None, decode_threads=1):
    rows = write_images_folder(tmp_path, shards)
    frame = pd.DataFrame(rows)

    def tar_of(shard):
        return str(tmp_path / f"{shard:05d}.tar")

    return clip_scoring.score_frame(frame, tiny, tar_of, shard_writer.iter_samples, batch_size, prefetch, multi,
                                    decode_threads)


def test_empty_partition(tiny):
    frame = pd.DataFrame({"key": [], "shard": [], "status": [], "text": [], "error_message": []})
    out, img, txt, t = clip_scoring.score_frame(frame, tiny, str, shard_writer.iter_samples)
    assert len(out) == 0 and img.shape == (0, 64) and t.batches == 0
    assert set(clip_scoring.SCORE_COLUMNS) <= set(out.columns)


def test_one_row_and_batch_larger_than_partition(tmp_path, tiny):
    out, img, txt, t = _score(tmp_path, [[Row("red", "circle")]], tiny, batch_size=256)
    assert t.batches == 1 and t.images == 1
    assert out.loc[0, "status"] == "success" and out.loc[0, "similarity"] > 0.4
    np.testing.assert_allclose(out.loc[0, "similarity"], float(img[0] @ txt[0]), atol=1e-6)
    np.testing.assert_allclose(embeddings.decode(out.loc[0, "image_embedding"]), img[0], atol=2e-3)
    assert out.loc[0, "tar_path"].endswith("00000.tar")


def test_batches_split_exactly_and_order_is_kept(tmp_path, tiny):
    rows = mixed_rows(7, mismatch_every=0)
    out1, img1, _, t1 = _score(tmp_path / "a", [rows], tiny, batch_size=3, prefetch=1)
    out2, img2, _, t2 = _score(tmp_path / "b", [rows], tiny, batch_size=7)
    out3, img3, _, t3 = _score(tmp_path / "c", [rows], tiny, batch_size=2, decode_threads=4)
    assert (t1.batches, t2.batches, t3.batches) == (3, 1, 4)
    assert list(out1["key"]) == list(out2["key"]) == list(out3["key"]) == sorted(out1["key"])
    np.testing.assert_allclose(img1, img2, atol=1e-5)   # batch size does not change results
    np.testing.assert_allclose(img1, img3, atol=1e-5)   # nor does the decode pool


@pytest.mark.parametrize("decode_threads", [1, 3])
def test_statuses_decode_failures_and_missing_samples(tmp_path, tiny, decode_threads):
    shards = [[Row("red", "circle"), Row(status="failed_to_download"), Row("blue", "star", corrupt=True),
               Row("green", "square", omit_from_tar=True), Row("yellow", "triangle", lang="de")],
              [Row("blue", "square", lang="fr"), Row(status="opted_out")]]
    out, img, txt, t = _score(tmp_path, shards, tiny, batch_size=2, decode_threads=decode_threads)
    by_key = out.set_index("key")
    assert list(out["status"]) == ["success", "failed_to_download", "failed_to_decode", "missing_from_shard",
                                   "success", "success", "opted_out"]
    assert "cannot identify image" in by_key.loc["000000002", "error_message"]
    assert "not found" in by_key.loc["000000003", "error_message"]
    assert by_key.loc["000000001", "error_message"] == "failed_to_download (generated)"   # untouched
    scored = out["similarity"].notna()
    assert list(scored) == [True, False, False, False, True, True, False]
    assert out.loc[~scored, "image_embedding"].isna().all() and out.loc[~scored, "text_embedding"].isna().all()
    assert out["similarity_multilingual"].isna().all()
    assert len(img) == len(txt) == 3
    assert out.loc[1, "tar_path"] is None and out.loc[2, "tar_path"].endswith("00000.tar")
    meta = clip_scoring.retrieval_metadata(out)
    assert list(meta["key"]) == list(out.loc[scored, "key"])


def test_unreadable_tar_marks_rows_missing(tmp_path, tiny):
    rows = write_images_folder(tmp_path, [[Row("red", "circle"), Row("blue", "star")]])
    (tmp_path / "00000.tar").write_bytes(b"\x00garbage" * 10)
    out, img, _, _ = clip_scoring.score_frame(pd.DataFrame(rows), tiny, lambda s: str(tmp_path / f"{s:05d}.tar"),
                                              shard_writer.iter_samples)
    assert set(out["status"]) == {"missing_from_shard"} and len(img) == 0
    assert out["error_message"].str.contains("cannot read shard").all()


def test_matching_captions_score_clearly_above_mismatched(tmp_path, tiny):
    rows = mixed_rows(48, mismatch_every=2)
    out, _, _, _ = _score(tmp_path, [rows], tiny, batch_size=16)
    match = np.array([r.matching for r in rows])
    sim = out["similarity"].to_numpy()
    assert sim[match].min() > sim[~match].max()
    assert sim[match].mean() - sim[~match].mean() > 0.4
    # and the preset's threshold (conf/presets/tiny_clip.yaml) separates them
    preset = yaml.safe_load((REPO / "conf" / "presets" / "tiny_clip.yaml").read_text())
    for bucket in ("en", "multi", "nolang"):
        threshold = preset["filter"]["thresholds"][bucket]
        assert sim[match].min() >= threshold > sim[~match].max()


def test_multilingual_model_fills_second_similarity(tmp_path, tiny):
    out, _, _, _ = _score(tmp_path, [[Row("red", "circle", lang="de"), Row(status="failed_to_download")]], tiny,
                          multi=tiny)
    assert out.loc[0, "similarity_multilingual"] == pytest.approx(out.loc[0, "similarity"], abs=1e-5)
    assert np.isnan(out.loc[1, "similarity_multilingual"])


def test_producer_errors_reach_the_caller(tmp_path, tiny):
    rows = write_images_folder(tmp_path, [[Row("red", "circle")]])

    class Boom(RuntimeError):
        pass

    class BadModel:
        dim = 64

        def preprocess(self, img):
            raise MemoryError("out of memory in preprocess")

        def tokenize(self, texts):
            raise Boom("tokenizer exploded")

    # a decode-time error is the row's outcome; an error outside a row (tokenizer) fails the task
    out, *_ = clip_scoring.score_frame(pd.DataFrame(rows), BadModel(), lambda s: str(tmp_path / f"{s:05d}.tar"),
                                       shard_writer.iter_samples)
    assert out.loc[0, "status"] == "failed_to_decode"

    class BadTokenizer(BadModel):
        def preprocess(self, img):
            return tiny.preprocess(img)

    with pytest.raises(Boom):
        clip_scoring.score_frame(pd.DataFrame(rows), BadTokenizer(), lambda s: str(tmp_path / f"{s:05d}.tar"),
                                 shard_writer.iter_samples)


def test_model_errors_mid_shard_fail_the_task_not_the_rows(tmp_path, tiny):
    """A tokenizer/model error while a shard is being read is not a tar problem: it must fail the
    task (Spark retries it), never mark the shard's remaining rows missing_from_shard."""
    rows = write_images_folder(tmp_path, [[Row("red", "circle"), Row("blue", "star"), Row("green", "square")]])

    class Boom(RuntimeError):
        pass

    class BadTokenizer:
        dim = 64

        def preprocess(self, img):
            return tiny.preprocess(img)

        calls = 0

        def tokenize(self, texts):   # fails once, as a transient device error would
            BadTokenizer.calls += 1
            if BadTokenizer.calls == 1:
                raise Boom("tokenizer exploded")
            return tiny.tokenize(texts)

    with pytest.raises(Boom):
        clip_scoring.score_frame(pd.DataFrame(rows), BadTokenizer(), lambda s: str(tmp_path / f"{s:05d}.tar"),
                                 shard_writer.iter_samples, batch_size=1)
