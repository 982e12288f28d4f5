"""The filter stage: thresholds and their boundaries, the language split on real sentences, the
subset schema, safety-head plumbing, kept + rejected == input, and the embeddings layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import datasets
from spark_jobs import filter as filter_stage
from spark_jobs.config import ConfigError
from spark_jobs.schemas import SUBSET
from udfs.filter import subset_filter
from udfs.ids import pair_uid, uid_to_int64

HEADS = Path(__file__).resolve().parent / "fixtures" / "safety_head"
DIM = 32

# (text, status, similarity, similarity_multilingual, expected outcome, image near the head's direction)
# outcome: a subset bucket ("en" / "multi" / "nolang") or the rejected status.
ROWS = [
    ("Children playing football in the park after school", "success", 0.28, None, "en", True),
    ("Woman in a blue summer dress walking on the beach", "success", 0.2799999, None, "below_threshold", False),
    ("Vintage wooden chair with leather seat", "success", 0.35, 0.10, "en", False),  # en ignores multilingual
    ("Gemütliches Wohnzimmer mit großem Sofa", "success", 0.20, 0.26, "multi", False),  # multilingual at boundary
    ("Die Kirche im Zentrum der Altstadt", "success", 0.40, 0.2599, "below_threshold", False),
    ("Les enfants jouent dans le jardin avec le chien", "success", 0.26, None, "multi", True),  # falls back
    ("Дети играют в саду с собакой", "success", 0.30, None, "multi", False),
    ("庭で犬と遊ぶ子どもたち", "success", 0.27, None, "multi", False),
    ("IMG_2034.jpg", "success", 0.26, None, "nolang", False),
    ("DSC 0042", "success", 0.2599, None, "below_threshold", False),
    ("12345", "success", 0.9, None, "nolang", True),
    ("Fresh homemade bread on the kitchen table", "success", None, None, "not_scored", False),
    ("Mountain lake at sunset with pine trees", "failed_to_download", None, None, "failed_to_download", False),
    ("Wedding cake decorated with white roses", "failed_to_decode", None, None, "failed_to_decode", False),
]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


SCORED_ARROW = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
    ("page_url", pa.string()), ("shard", pa.int32()), ("status", pa.string()),
    ("error_message", pa.string()), ("http_status", pa.int32()), ("content_type", pa.string()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("width", pa.int32()),
    ("height", pa.int32()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("download_seconds", pa.float64()), ("retryable", pa.bool_()),
    ("similarity", pa.float64()), ("similarity_multilingual", pa.float64()),
    ("image_embedding", pa.binary()), ("text_embedding", pa.binary()), ("tar_path", pa.string())])


def make_scored_from_records(folder: Path, records: list[dict]) -> pd.DataFrame:
    """Write rows as a clip_score output (contract 3: SCORED columns, partitioned by status);
    columns a record does not give get plausible download-metadata defaults."""
    defaults = {"page_url": "http://127.0.0.1/page", "shard": 0, "error_message": None,
                "http_status": 200, "content_type": "image/jpeg", "original_width": 64,
                "original_height": 64, "width": 64, "height": 64, "bytes": 10000, "sha256": "0" * 64,
                "download_seconds": 0.1, "retryable": False, "similarity_multilingual": None,
                "tar_path": str(folder.parent / "images" / "00000.tar")}
    pdf = pd.DataFrame([{**defaults, **r} for r in records])
    table = pa.Table.from_pandas(pdf[SCORED_ARROW.names], preserve_index=False, schema=SCORED_ARROW)
    pq.write_to_dataset(table, str(folder), partition_cols=["status"])
    return pdf


def make_scored(folder: Path, rows=ROWS, dim: int = DIM, seed: int = 0) -> pd.DataFrame:
    """The ROWS above as a scored dataset, with float16 embeddings made with numpy."""
    rng = np.random.default_rng(seed)
    u = np.load(HEADS / "direction_d32.npy") if dim == 32 else _unit(rng.standard_normal(dim))
    records = []
    for i, (text, status, sim, msim, _, near) in enumerate(rows):
        url = f"http://127.0.0.1/img/{i}.jpg"
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= (noise @ u) * u
        img = _unit(u + 0.2 * _unit(noise)) if near else _unit(noise)
        txt = _unit(rng.standard_normal(dim).astype(np.float32))
        has = status == "success"
        records.append({
            "key": f"00000{i:04d}", "uid": pair_uid(url, text), "url": url, "text": text,
            "status": status, "error_message": None if has else f"earlier error {i}",
            "original_width": 640 + i, "original_height": 480 + i, "width": 256, "height": 256,
            "similarity": sim, "similarity_multilingual": msim,
            "image_embedding": img.astype("<f2").tobytes() if has else None,
            "text_embedding": txt.astype("<f2").tobytes() if has else None,
        })
    return make_scored_from_records(folder, records)


def _args(inp, out):
    return argparse.Namespace(input=str(inp), output=str(out), rejected_output=None)


@pytest.fixture(scope="module")
def filtered(spark, cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    scored = root / "scored"
    pdf = make_scored(scored)
    c = cfg.with_overrides([f"filter.punsafe_head={HEADS / 'linear_d32.npz'}", "filter.embeddings_per_file=3"])
    stats = filter_stage.run(spark, c, _args(scored, root / "dataset"))
    return root / "dataset", pdf, stats, c


def _read_subsets(spark, dataset: Path, c) -> dict[str, pd.DataFrame]:
    out = {}
    for bucket, name in c.get("filter.subsets").items():
        out[bucket] = spark.read.parquet(str(dataset / name)).toPandas()
    return out


@pytest.mark.slow  # shares one stage run
def test_threshold_and_language_split(spark, filtered):
    dataset, pdf, stats, c = filtered
    subsets = _read_subsets(spark, dataset, c)
    for bucket in ("en", "multi", "nolang"):
        want = sorted(t for t, *_, outcome, _ in ROWS if outcome == bucket)
        assert sorted(subsets[bucket]["TEXT"]) == want, bucket
    assert set(subsets["en"]["LANGUAGE"]) == {"en"}
    assert sorted(subsets["multi"]["LANGUAGE"]) == sorted(["de", "fr", "ru", "ja"])
    assert subsets["nolang"]["LANGUAGE"].isna().all()
    # multi rows carry the score the threshold was applied to
    de = subsets["multi"].set_index("TEXT").loc["Gemütliches Wohnzimmer mit großem Sofa"]
    assert de["similarity"] == pytest.approx(0.26)
    en = subsets["en"].set_index("TEXT").loc["Vintage wooden chair with leather seat"]
    assert en["similarity"] == pytest.approx(0.35)


@pytest.mark.slow  # shares one stage run
def test_rejected_rows_keep_reason_and_add_up(spark, filtered):
    dataset, pdf, stats, _ = filtered
    rejected = spark.read.parquet(str(dataset) + "_rejected").toPandas().set_index("text")
    for text, status, sim, msim, outcome, _ in ROWS:
        if outcome in ("en", "multi", "nolang"):
            assert text not in rejected.index
            continue
        row = rejected.loc[text]
        assert row["status"] == outcome
        if outcome == "below_threshold":
            used = msim if (msim is not None and not text.startswith("Woman")) else sim
            assert row["score"] == pytest.approx(used) and row["score"] < row["threshold"]
            assert f"{used:.4f}" in row["error_message"]
        elif status != "success":
            assert row["error_message"] == f"earlier error {ROWS.index((text, status, sim, msim, outcome, False))}"
    kept = sum(s["rows"] for s in stats["subsets"].values())
    assert kept + len(rejected) == len(ROWS) == stats["input_rows"]
    assert stats["balanced"] and stats["kept"] == kept
    assert stats["rejected_by_status"] == {"below_threshold": 3, "not_scored": 1,
                                           "failed_to_download": 1, "failed_to_decode": 1}


@pytest.mark.slow  # shares one stage run
def test_subset_schema_and_ids(spark, filtered):
    dataset, pdf, _, c = filtered
    for name in c.get("filter.subsets").values():
        df = spark.read.parquet(str(dataset / name))
        datasets.check_schema(df, SUBSET, str(dataset / name))
        assert df.columns == SUBSET.schema.fieldNames()
        assert [f.dataType for f in df.schema.fields] == [f.dataType for f in SUBSET.schema.fields]
        # plain parquet readers (pandas, clip-retrieval) see the same columns in every file
        for f in (dataset / name).glob("*.parquet"):
            assert pq.read_schema(f).names == SUBSET.schema.fieldNames()
    subsets = pd.concat(_read_subsets(spark, dataset, c).values())
    by_text = pdf.set_index("text")
    for _, row in subsets.iterrows():
        src = by_text.loc[row["TEXT"]]
        assert row["SAMPLE_ID"] == row["hash"] == uid_to_int64(src["uid"])
        assert (row["URL"], row["key"], row["tar_path"]) == (src["url"], src["key"], src["tar_path"])
        assert (row["WIDTH"], row["HEIGHT"]) == (src["original_width"], src["original_height"])


@pytest.mark.slow  # shares one stage run
def test_safety_head_plumbing(spark, filtered):
    dataset, _, stats, c = filtered
    subsets = pd.concat(_read_subsets(spark, dataset, c).values()).set_index("TEXT")
    near = {t for t, *_, outcome, n in ROWS if n and outcome in ("en", "multi", "nolang")}
    assert subsets["punsafe"].notna().all()
    assert (subsets.loc[sorted(near), "punsafe"] > 0.9).all()
    assert (subsets.drop(index=sorted(near))["punsafe"] < 0.01).all()
    assert subsets["pwatermark"].isna().all()  # no head configured: null, never a made-up number
    assert stats["safety_heads"]["pwatermark"] is None


@pytest.mark.slow  # shares one stage run
def test_embeddings_layout_is_row_aligned(filtered):
    dataset, pdf, stats, c = filtered
    by_id = {uid_to_int64(u): (i, t) for u, i, t in zip(pdf["uid"], pdf["image_embedding"], pdf["text_embedding"])}
    for name in c.get("filter.subsets").values():
        root = dataset / "embeddings" / name
        metas = sorted((root / "metadata").glob("metadata_*.parquet"))
        total = 0
        for meta_file in metas:
            part = meta_file.stem.split("_")[-1]
            meta = pq.read_table(meta_file).to_pandas()
            assert list(meta.columns) == list(subset_filter.EMBEDDING_METADATA_COLUMNS)
            img = np.load(root / "img_emb" / f"img_emb_{part}.npy")
            txt = np.load(root / "text_emb" / f"text_emb_{part}.npy")
            assert img.dtype == np.float16 and img.shape == (len(meta), DIM) == txt.shape
            for k, sid in enumerate(meta["SAMPLE_ID"]):
                src_img, src_txt = by_id[sid]
                np.testing.assert_array_equal(img[k], np.frombuffer(src_img, "<f2"))
                np.testing.assert_array_equal(txt[k], np.frombuffer(src_txt, "<f2"))
            total += len(meta)
        assert total == stats["subsets"][name]["rows"]
        assert stats["subsets"][name]["embedding_parts"] == len(metas)
    # 4 multi rows with 3 per file: two parts
    assert stats["subsets"][c.get("filter.subsets.multi")]["embedding_parts"] == 2


@pytest.mark.slow  # shares one stage run
def test_stats_histogram_and_languages(filtered):
    _, _, stats, _ = filtered
    hist = stats["similarity_histogram"]
    assert len(hist["scored"]) == hist["bins"] == 200
    kept = sum(1 for r in ROWS if r[4] in ("en", "multi", "nolang"))
    assert sum(hist["scored"]) == stats["scored_rows"] == kept + stats["rejected_by_status"]["below_threshold"]
    assert sum(hist["kept"]) == stats["kept"] == kept
    # the three kept rows scored exactly 0.26 fall in the bin [0.26, 0.27), the two at 0.2599 below it
    b = round((0.26 - hist["min"]) / hist["bin_width"])
    at = sum(1 for r in ROWS if r[4] in ("multi", "nolang") and (r[3] if r[3] is not None else r[2]) == 0.26)
    assert at == 3 and hist["kept"][b] == at and hist["scored"][b - 1] == 2
    assert stats["languages"] == {"en": 2, "none": 2, "de": 1, "fr": 1, "ru": 1, "ja": 1}
    written = datasets.read_stats(str(filtered[0]))
    assert written["stage"] == "filter" and written["kept"] == kept


@pytest.mark.slow  # shares one stage run
def test_language_confidence_and_cutoff_are_kept(spark, filtered):
    """language_confidence is in every subset (nolang too) and the rejected rows, and the stats
    name the detector and the cut-off it applied, so a split can be redone without re-detecting."""
    dataset, _, stats, c = filtered
    cut = stats["min_language_confidence"]
    assert stats["language_detector"] == c.get("filter.language_detector") == "hybrid"
    assert cut == 0.5 and "default" in stats["min_language_confidence_source"]
    subsets = _read_subsets(spark, dataset, c)
    for bucket in ("en", "multi"):
        assert (subsets[bucket]["language_confidence"] >= cut).all(), bucket
    assert (subsets["nolang"]["language_confidence"] < cut).all()
    rejected = spark.read.parquet(str(dataset) + "_rejected").toPandas()
    below = rejected[rejected["status"] == "below_threshold"]
    assert below["language_confidence"].notna().all() and len(below) == 3


def test_empty_input(spark, cfg, tmp_path):
    scored = tmp_path / "scored"
    make_scored(scored, rows=[r for r in ROWS if r[1] != "success"])
    stats = filter_stage.run(spark, cfg, _args(scored, tmp_path / "dataset"))
    assert stats["kept"] == 0 and stats["rejected"] == 2 and stats["balanced"]
    assert stats["subsets"]["laion2B-en"]["embedding_parts"] == 0


def test_head_dimension_mismatch_is_a_config_error(spark, cfg, tmp_path):
    scored = tmp_path / "scored"
    make_scored(scored, rows=ROWS[:2], dim=16)
    c = cfg.with_overrides([f"filter.punsafe_head={HEADS / 'linear_d32.npz'}"])
    with pytest.raises(ConfigError, match="dimension 32"):
        filter_stage.run(spark, c, _args(scored, tmp_path / "dataset"))


# --- without Spark ---------------------------------------------------------------------------------

def _section(cfg, **over):
    s = cfg.section("filter")
    s.update(over)
    return s


def test_thresholds_preset_and_overrides(cfg):
    assert filter_stage.resolve_thresholds(_section(cfg)) == {"en": 0.28, "multi": 0.26, "nolang": 0.26}
    assert filter_stage.resolve_thresholds(_section(cfg, preset="laion400m")) == \
        {"en": 0.30, "multi": 0.30, "nolang": 0.30}
    assert filter_stage.resolve_thresholds(_section(cfg, preset="laion5b")) == \
        {"en": 0.28, "multi": 0.26, "nolang": 0.26}
    custom = cfg.with_overrides(["filter.thresholds.en=0.31"]).section("filter")
    assert filter_stage.resolve_thresholds(custom) == {"en": 0.31, "multi": 0.26, "nolang": 0.26}
    # a preset is an explicit choice: it replaces all three thresholds
    both = cfg.with_overrides(["filter.thresholds.en=0.31", "filter.preset=laion400m"]).section("filter")
    assert filter_stage.resolve_thresholds(both) == {"en": 0.30, "multi": 0.30, "nolang": 0.30}
    with pytest.raises(ConfigError, match="filter.thresholds.multi is not set"):
        filter_stage.resolve_thresholds(_section(cfg, thresholds={"en": 0.2, "multi": None, "nolang": 0.1}))
    with pytest.raises(ConfigError, match="not in filter.presets"):
        filter_stage.resolve_thresholds(_section(cfg, preset="laion9b"))
    with pytest.raises(ConfigError, match="unknown buckets"):
        filter_stage.resolve_thresholds(_section(cfg, thresholds={"en": 0.3, "multi": 0.3, "nolang": 0.3,
                                                                  "english": 0.3}))
    with pytest.raises(ConfigError, match="must be a number"):
        filter_stage.resolve_thresholds(_section(cfg, thresholds={"en": "high", "multi": 0.3, "nolang": 0.3}))


def test_build_settings_rejects_bad_config(cfg):
    with pytest.raises(ConfigError, match="safety head not found"):
        filter_stage.build_settings(cfg.with_overrides(["filter.punsafe_head=/nonexistent/head.npz"]))
    with pytest.raises(ConfigError, match="language_detector"):
        filter_stage.build_settings(cfg.with_overrides(["filter.language_detector=langdetect"]))


def test_annotate_boundary_without_spark(cfg):
    """score == threshold is kept, one ulp below is not (LAION kept >= threshold)."""
    t = 0.28
    below = np.nextafter(t, 0.0)
    emb = _unit(np.ones(DIM, np.float32)).astype("<f2").tobytes()
    pdf = pd.DataFrame({"uid": ["0" * 16, "1" * 16], "key": ["a", "b"], "url": ["u", "v"],
                        "text": ["Children playing football in the park after school"] * 2,
                        "status": ["success"] * 2, "error_message": [None, None],
                        "similarity": [t, below], "similarity_multilingual": [None, None],
                        "image_embedding": [emb, emb], "text_embedding": [emb, emb], "tar_path": ["x", "x"]})
    settings = filter_stage.build_settings(cfg)
    out = subset_filter.annotate(pdf, settings)
    assert list(out["status"]) == ["success", "below_threshold"]
    assert list(out["bucket"]) == ["en", "en"] and out["punsafe"].isna().all()
