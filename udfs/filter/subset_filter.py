"""Row logic of the `filter` stage (pure pandas/numpy, no Spark): language bucket, threshold
decision, safety-head columns, and writing one part of the clip-retrieval embeddings layout.

`annotate(pdf, settings)` takes a batch of `clip_score` output rows and returns the same rows with
their final `status` (`success` = kept; `below_threshold`; `not_scored`; or the earlier status
unchanged), the language bucket, the score the threshold was applied to, and the subset columns.
Only `success` rows with a non-null `similarity` and both embeddings are candidates (the others
become `not_scored`), so every kept row has a row in the embeddings layout.

Which score: English uses `similarity` (the English CLIP model); other languages and no-language
use `similarity_multilingual` when it is not null (a multilingual model was configured in
clip_score), else `similarity`, as LAION-5B did (mCLIP for multi). The chosen score is the
subset's `similarity` column. A row is kept when score >= threshold (LAION: "keep >= 0.28").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from udfs.clip import embeddings
from udfs.filter import langid, safety_heads
from udfs.ids import pair_uid, uid_to_int64

BUCKETS = ("en", "multi", "nolang")
KEPT = "success"
BELOW = "below_threshold"
NOT_SCORED = "not_scored"

# Columns added by `annotate` (names and pandas dtypes; spark_jobs/filter.py declares the Spark types).
ANNOTATED_COLUMNS = ("uid", "key", "url", "text", "status", "error_message", "similarity",
                     "similarity_multilingual", "score", "threshold", "bucket", "LANGUAGE",
                     "language_confidence", "SAMPLE_ID", "WIDTH", "HEIGHT", "punsafe", "pwatermark",
                     "image_embedding", "text_embedding", "tar_path", "image_offset", "image_size")

EMBEDDING_METADATA_COLUMNS = ("SAMPLE_ID", "URL", "TEXT", "similarity", "LANGUAGE", "punsafe",
                              "pwatermark", "key", "tar_path",
                              "WIDTH", "HEIGHT")  # original size, for serve's size filter (null if absent)


def bucket_of(language: str | None) -> str:
    if language is None:
        return "nolang"
    return "en" if language.split("-")[0] == "en" else "multi"


def _first_int(*series: pd.Series) -> pd.Series:
    out = series[0]
    for s in series[1:]:
        out = out.where(out.notna(), s)
    return out


def annotate(pdf: pd.DataFrame, settings: dict[str, Any]) -> pd.DataFrame:
    """Decide every row of one batch. `settings`: thresholds {en, multi, nolang}, detector,
    min_language_confidence, languages, punsafe_head, pwatermark_head, storage_options."""
    n = len(pdf)
    out = pd.DataFrame({c: pdf[c] if c in pdf else None for c in
                        ("uid", "key", "url", "text", "status", "error_message", "similarity",
                         "similarity_multilingual", "image_embedding", "text_embedding", "tar_path")},
                       index=pdf.index)
    for col in ("score", "threshold", "language_confidence", "punsafe", "pwatermark"):
        out[col] = pd.Series(np.full(n, np.nan), index=pdf.index, dtype="float64")
    out["bucket"] = pd.Series([None] * n, index=pdf.index, dtype=object)
    out["LANGUAGE"] = pd.Series([None] * n, index=pdf.index, dtype=object)
    uid = out["uid"].where(out["uid"].notna(),
                           [pair_uid(u or "", t or "") for u, t in zip(out["url"], out["text"])])
    out["uid"] = uid
    out["SAMPLE_ID"] = pd.array([uid_to_int64(u) for u in uid], dtype="Int64")
    width = [pdf[c] if c in pdf else pd.Series([None] * n, index=pdf.index, dtype=object)
             for c in ("original_width", "width")]
    height = [pdf[c] if c in pdf else pd.Series([None] * n, index=pdf.index, dtype=object)
              for c in ("original_height", "height")]
    out["WIDTH"] = pd.array(_first_int(*width), dtype="Int64") if n else pd.array([], dtype="Int64")
    out["HEIGHT"] = pd.array(_first_int(*height), dtype="Int64") if n else pd.array([], dtype="Int64")
    for col in ("image_offset", "image_size"):   # where the image lies in tar_path (export reads it)
        out[col] = pd.array(pdf[col] if col in pdf else [None] * n, dtype="Int64")

    status = out["status"].astype(object)
    success = (status == KEPT).to_numpy(dtype=bool)
    has_sim = out["similarity"].notna().to_numpy(dtype=bool)
    has_emb = (out["image_embedding"].notna() & out["text_embedding"].notna()).to_numpy(dtype=bool)
    scored = success & has_sim & has_emb
    out.loc[success & ~has_sim, "error_message"] = "status success but no similarity (not scored by clip_score)"
    out.loc[success & has_sim & ~has_emb, "error_message"] = "status success but no image/text embedding"
    out.loc[success & ~scored, "status"] = NOT_SCORED

    idx = np.flatnonzero(scored)
    if len(idx):
        detector = langid.get_detector(settings["detector"], settings["min_language_confidence"],
                                       settings.get("languages"))
        texts = [t if isinstance(t, str) else None for t in out["text"].iloc[idx]]
        detected = detector.detect_batch(texts)
        langs = [code for code, _ in detected]
        buckets = [bucket_of(code) for code in langs]
        sim = out["similarity"].iloc[idx].to_numpy(dtype=float)
        multi = out["similarity_multilingual"].iloc[idx].to_numpy(dtype=float)
        use_multi = np.array([b != "en" for b in buckets]) & ~np.isnan(multi)
        score = np.where(use_multi, multi, sim)
        thresholds = settings["thresholds"]
        thr = np.array([float(thresholds[b]) for b in buckets])
        keep = score >= thr
        rows = out.index[idx]
        out.loc[rows, "LANGUAGE"] = pd.Series(langs, index=rows, dtype=object)
        out.loc[rows, "language_confidence"] = [c for _, c in detected]
        out.loc[rows, "bucket"] = pd.Series(buckets, index=rows, dtype=object)
        out.loc[rows, "score"] = score
        out.loc[rows, "threshold"] = thr
        column = np.where(use_multi, "similarity_multilingual", "similarity")
        below = rows[~keep]
        out.loc[below, "status"] = BELOW
        out.loc[below, "error_message"] = [
            f"{col} {s:.4f} < {t:g} ({b})" for col, s, t, b, k in zip(column, score, thr, buckets, keep) if not k]
        kept_rows = rows[keep]
        _safety(out, kept_rows, settings)
    out["similarity"] = out["similarity"].astype("float64")
    out["similarity_multilingual"] = out["similarity_multilingual"].astype("float64")
    return out[list(ANNOTATED_COLUMNS)]


def _safety(out: pd.DataFrame, rows: pd.Index, settings: dict[str, Any]) -> None:
    """punsafe / pwatermark for kept rows that have an image embedding; null otherwise."""
    heads = {"punsafe": settings.get("punsafe_head"), "pwatermark": settings.get("pwatermark_head")}
    if not len(rows) or not any(heads.values()):
        return
    emb = embeddings.decode_rows(out.loc[rows, "image_embedding"])
    for column, uri in heads.items():
        probs = safety_heads.score(uri, emb, settings.get("storage_options"))
        if probs is not None:
            out.loc[rows, column] = probs


def parts_for(rows: int, per_file: int) -> int:
    return max(1, math.ceil(rows / max(1, per_file)))


def write_embedding_part(root: str, part: int, pdf: pd.DataFrame,
                         storage_options: dict | None = None) -> int:
    """Write `img_emb/img_emb_{part}.npy`, `text_emb/text_emb_{part}.npy` (float16) and
    `metadata/metadata_{part}.parquet` under `root`, row-aligned, in the order of `pdf`
    (udfs.clip.embeddings.write_retrieval_part; metadata last, each file atomic), so a retried task
    rewrites the same part with the same content. `pdf` holds the subset columns plus the
    `image_embedding` / `text_embedding` blobs."""
    import pyarrow as pa

    if not len(pdf):
        return 0
    meta = pdf.reindex(columns=list(EMBEDDING_METADATA_COLUMNS)).reset_index(drop=True)
    table = pa.Table.from_pandas(meta, preserve_index=False, schema=pa.schema([
        ("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
        ("similarity", pa.float64()), ("LANGUAGE", pa.string()), ("punsafe", pa.float64()),
        ("pwatermark", pa.float64()), ("key", pa.string()), ("tar_path", pa.string()),
        ("WIDTH", pa.int32()), ("HEIGHT", pa.int32())]))
    embeddings.write_retrieval_part(root, part, embeddings.decode_rows(pdf["image_embedding"]),
                                    embeddings.decode_rows(pdf["text_embedding"]), table, storage_options)
    return len(pdf)
