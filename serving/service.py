"""The kNN query service behind `clipcrawl serve`, independent of HTTP so it can be unit-tested.

Request fields mirror clip-retrieval's back end (`/knn-service`), so its front end and
`ClipClient` can talk to this server: text, image (base64), embedding_input, modality,
num_images, num_result_ids, indice_name, deduplicate, use_safety_model. Fields that cost a model
we do not have (use_violence_detector, aesthetic_score/aesthetic_weight, use_mclip) are accepted
and ignored; `image_url` is refused because the server never fetches remote URLs.

Every problem with a request is an `ApiError` with an HTTP status and a message; nothing a client
sends can crash the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import threading
from typing import Any
from urllib.parse import quote

import numpy as np

from serving.thumbnails import ThumbnailReader
from serving.vectors import RowVectors
from udfs.index import layout, search

log = logging.getLogger(__name__)

QUERY_FIELDS = ("text", "image", "image_url", "embedding_input")
ALL_SUBSETS = "all"   # indice_name that searches every subset (also: none given)
IGNORED_FIELDS = ("use_violence_detector", "violence_detector", "aesthetic_score", "aesthetic_weight",
                  "use_mclip")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _int_field(body: dict, names: tuple[str, ...], default: int, low: int, high: int) -> int:
    for name in names:
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ApiError(400, f"{name} must be an integer")
            try:
                number = float(value)
            except ValueError:
                raise ApiError(400, f"{name} must be an integer, got {value!r}") from None
            if not math.isfinite(number) or number != int(number):
                raise ApiError(400, f"{name} must be an integer, got {value!r}")
            if not low <= int(number) <= high:
                raise ApiError(400, f"{name} must be between {low} and {high}, got {int(number)}")
            return int(number)
    return default


def _bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false")
    return value


def decode_image(data: str | bytes, max_bytes: int):
    """base64 (optionally a data: URL) or raw bytes -> RGB PIL image, or ApiError 400/413."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise ApiError(413, f"image is larger than {max_bytes} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image must be base64-encoded image bytes") from None
    else:
        raw = data
    if not raw:
        raise ApiError(400, "image is empty")
    if len(raw) > max_bytes:
        raise ApiError(413, f"image is larger than {max_bytes} bytes")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise ApiError(400, f"image could not be decoded as an image ({type(exc).__name__})") from None


class KnnService:
    """Loaded subsets + the query encoder + the request logic."""

    def __init__(self, indices: dict[str, search.SubsetIndex], serve_cfg: dict,
                 encoder: search.QueryEncoder | None = None, storage_options: dict | None = None):
        if not indices:
            raise ValueError("no index to serve")
        self.indices = indices
        self.cfg = serve_cfg
        self.encoder = encoder
        self._model_lock = threading.Lock()
        self.thumbnails = ThumbnailReader(int(serve_cfg.get("thumbnail_cache") or 64), storage_options)
        self.vectors = RowVectors(storage_options)

    # -- listing ----------------------------------------------------------------------------
    def indices_list(self) -> list[str]:
        return list(self.indices)

    def describe(self) -> dict:
        return {"indices": {name: {"size": idx.size, "dim": idx.dim,
                                   "index_key": {k: v.get("index_key") for k, v in
                                                 idx.infos.get("indices", {}).items()},
                                   "recall@10": {k: v.get("recall@10") for k, v in
                                                 idx.infos.get("indices", {}).items()}}
                            for name, idx in self.indices.items()},
                "max_k": int(self.cfg["max_k"]), "default_k": int(self.cfg["default_k"]),
                "punsafe_threshold": float(self.cfg["punsafe_threshold"]),
                "languages": self.languages(),
                "text_and_image_queries": self.encoder is not None}

    def languages(self) -> list[str]:
        """Caption languages present in the served subsets ("none": no detected language)."""
        import pyarrow.compute as pc

        found = set()
        for idx in self.indices.values():
            if idx.ids is not None and "LANGUAGE" in idx.ids.column_names:
                found.update(v if v else "none" for v in pc.unique(idx.ids.column("LANGUAGE")).to_pylist())
        return sorted(found, key=lambda v: (v == "none", v))

    def subset(self, name: Any) -> search.SubsetIndex:
        if name is None or name == "":
            return next(iter(self.indices.values()))
        if not isinstance(name, str) or name not in self.indices:
            raise ApiError(404, f"unknown indice_name {name!r}; have: {', '.join(self.indices)}")
        return self.indices[name]

    # -- embedding the query -----------------------------------------------------------------
    def _encode(self, what: str, value) -> np.ndarray:
        if self.encoder is None:
            raise ApiError(503, f"{what} queries need the CLIP model, and this server runs without "
                                "one: send embedding_input instead")
        try:
            with self._model_lock:  # one torch forward at a time; the model is not re-entrant
                if what == "text":
                    return self.encoder.encode_text(value)
                return self.encoder.encode_image(value)
        except (ValueError, ImportError, OSError) as exc:  # ModelLoadError is a ValueError
            log.error("query encoder failed: %s", exc)
            raise ApiError(503, f"the CLIP model is unavailable: {exc}") from None

    def query_vector(self, body: dict, dim: int | None) -> np.ndarray:
        given = [f for f in QUERY_FIELDS if body.get(f) not in (None, "")]
        if "image_url" in given:
            raise ApiError(400, "image_url is not supported: this server never fetches remote URLs; "
                                "send the image bytes base64-encoded in `image`")
        if not given:
            if isinstance(body.get("text"), str):
                raise ApiError(400, "text is empty")
            raise ApiError(400, "give one of: text, image (base64), embedding_input")
        vectors = []
        if "text" in given:
            text = body["text"]
            if not isinstance(text, str):
                raise ApiError(400, "text must be a string")
            if not text.strip():
                raise ApiError(400, "text is empty")
            if len(text) > int(self.cfg["max_text_length"]):
                raise ApiError(400, f"text is longer than {self.cfg['max_text_length']} characters")
            vectors.append(self._encode("text", text.strip()))
        if "image" in given:
            if not isinstance(body["image"], str):
                raise ApiError(400, "image must be a base64 string")
            vectors.append(self._encode("image", decode_image(body["image"],
                                                              int(self.cfg["max_upload_bytes"]))))
        if "embedding_input" in given:
            emb = body["embedding_input"]
            if not isinstance(emb, list) or not emb or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in emb):
                raise ApiError(400, "embedding_input must be a non-empty list of numbers")
            vec = np.asarray(emb, dtype=np.float32)
            if not np.all(np.isfinite(vec)) or not np.any(vec):
                raise ApiError(400, "embedding_input must be finite and not all zeros")
            vectors.append(vec)
        if dim is not None:
            for v in vectors:
                if v.shape[-1] != dim:
                    raise ApiError(400, f"query has dimension {v.shape[-1]}, the index has {dim}")
        # Several inputs (text + image, as clip-retrieval allows) are combined by summing the unit
        # vectors: the direction halfway between the two queries.
        total = sum(v / (np.linalg.norm(v) or 1.0) for v in vectors)
        return np.asarray(total, dtype=np.float32)

    # -- the query ---------------------------------------------------------------------------
    def subsets_for(self, name: Any) -> list[search.SubsetIndex]:
        """The subsets one query runs on: all of them for a missing/empty name or "all"."""
        if name is None or name in ("", ALL_SUBSETS):
            return list(self.indices.values())
        return [self.subset(name)]

    def knn(self, body: Any) -> list[dict]:
        """clip-retrieval's `/knn-service`: a list of results, best first.

        Without `indice_name` (or with "all") every subset is searched and the hits are merged
        by score, each labelled with its `subset`. Filters (the search page's controls):
        `language`, `min_similarity` (of the hit to the query), `hide_unsafe` (= clip-retrieval's
        `use_safety_model`: punsafe above serve.punsafe_threshold is dropped, rows without a
        punsafe are kept and marked `safety_scored: false`), `min_width` / `min_height` (original
        size; rows of an index without sizes are kept and marked `size_known: false`)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        max_k = int(self.cfg["max_k"])
        k = _int_field(body, ("num_images", "num_results", "k"), int(self.cfg["default_k"]), 1, max_k)
        modality = body.get("modality") or "image"
        if modality not in layout.INDEX_FILES:
            raise ApiError(400, f"modality must be 'image' or 'text', got {modality!r}")
        deduplicate = _bool_field(body, "deduplicate", True)
        safety = _bool_field(body, "use_safety_model", False) or _bool_field(body, "hide_unsafe", False)
        filters = _filters(body)
        filtering = deduplicate or safety or bool(filters)
        # filters can drop most hits: look further down the list when they are on
        widen = 10 if filters else 3
        default_ids = min(int(self.cfg["max_result_ids"]), k * widen if filtering else k)
        num_ids = _int_field(body, ("num_result_ids",), default_ids, 1, int(self.cfg["max_result_ids"]))
        num_ids = max(num_ids, k)
        subsets = self.subsets_for(body.get("indice_name"))
        dims = {s.dim for s in subsets if s.dim is not None}
        if len(dims) > 1:
            raise ApiError(400, "the subsets have different embedding sizes; choose one indice_name")
        vector = self.query_vector(body, next(iter(dims), None))
        rows = []
        for subset in subsets:
            try:
                hits = subset.search(vector, modality, num_ids)
            except layout.QueryError as exc:
                raise ApiError(400, str(exc)) from None
            rows.extend(dict(r, subset=subset.name) for r in hits)
        rows.sort(key=lambda r: -r["score"])
        if safety:
            cut = float(self.cfg["punsafe_threshold"])
            rows = [r for r in rows if r.get("punsafe") is None or r["punsafe"] <= cut]
        rows = [r for r in rows if _passes(r, filters)]
        if deduplicate:
            rows = _deduplicate(rows)
        return [self._result(r["subset"], r, with_page=True) for r in rows[:k]]

    def embedding(self, indice_name: Any, raw_id: Any, modality: Any = "image") -> dict:
        """The stored embedding of one row (for "search similar": send it as embedding_input)."""
        subset = self.subset(indice_name)
        index_id = _row_id(subset, raw_id)
        modality = modality or "image"
        if modality not in layout.INDEX_FILES:
            raise ApiError(400, f"modality must be 'image' or 'text', got {modality!r}")
        try:
            vec, source = self.vectors.vector(subset, index_id, modality)
        except RuntimeError as exc:
            raise ApiError(404, f"no stored vector for id {index_id}: {exc}") from None
        return {"indice_name": subset.name, "id": index_id, "modality": modality, "source": source,
                "embedding": [round(float(v), 6) for v in vec]}

    def metadata(self, body: Any) -> list[dict]:
        """clip-retrieval's `/metadata`: {ids: [...], indice_name} -> [{id, metadata}]."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        subset = self.subset(body.get("indice_name"))
        ids = body.get("ids")
        if not isinstance(ids, list) or len(ids) > int(self.cfg["max_k"]) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError(400, f"ids must be a list of at most {self.cfg['max_k']} integers")
        bad = [i for i in ids if not 0 <= i < subset.size]
        if bad:
            raise ApiError(404, f"ids out of range for {subset.name!r}: {bad[:5]}")
        rows = subset.lookup(np.asarray(ids, dtype=np.int64))
        return [{"id": int(r["index_id"]), "metadata": self._result(subset.name, r)} for r in rows]

    def _result(self, subset: str, row: dict, with_page: bool = False) -> dict:
        out = {"id": int(row["index_id"]), "url": row.get("URL"), "caption": row.get("TEXT"),
               "similarity": row.get("score"), "SAMPLE_ID": row.get("SAMPLE_ID"),
               "clip_similarity": row.get("similarity"), "LANGUAGE": row.get("LANGUAGE"),
               "punsafe": row.get("punsafe"), "pwatermark": row.get("pwatermark"),
               "key": row.get("key"), "subset": subset, "width": row.get("WIDTH"),
               "height": row.get("HEIGHT"), "safety_scored": row.get("punsafe") is not None,
               "size_known": row.get("WIDTH") is not None and row.get("HEIGHT") is not None}
        if row.get("tar_path") and row.get("key"):
            out["thumbnail"] = f"/thumbnail?indice_name={quote(subset)}&id={int(row['index_id'])}"
            if with_page:
                # The page the image was found on is in the sample's json in the shard (the LAION
                # columns do not carry it); the browser reads the same shard for the thumbnail.
                sample = self.thumbnails.read_json(row["tar_path"], row["key"]) or {}
                page = sample.get("page_url")
                if isinstance(page, str) and page.startswith(("http://", "https://")):
                    out["page_url"] = page
        return {k: v for k, v in out.items() if v is not None or k in ("similarity",)}

    # -- thumbnails --------------------------------------------------------------------------
    def thumbnail(self, indice_name: Any, raw_id: Any) -> tuple[bytes, str]:
        subset = self.subset(indice_name)
        index_id = _row_id(subset, raw_id)
        row = subset.lookup(np.asarray([index_id]))[0]
        if not row.get("tar_path") or not row.get("key"):
            raise ApiError(404, f"id {index_id} has no image in a shard")
        found = self.thumbnails.read(row["tar_path"], row["key"])
        if found is None:
            raise ApiError(404, f"image {row['key']} not found in {row['tar_path']}")
        return found


def _float_field(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, f"{name} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ApiError(400, f"{name} must be between {low} and {high}, got {value!r}")
    return number


def _filters(body: dict) -> dict:
    """The result filters a request asks for (absent ones are left out)."""
    out: dict[str, Any] = {}
    lang = body.get("language")
    if lang not in (None, ""):
        if not isinstance(lang, str) or len(lang) > 16:
            raise ApiError(400, "language must be a language code such as 'en' (or 'none')")
        out["language"] = lang.strip().lower()
    sim = _float_field(body, "min_similarity", -1.0, 1.0)
    if sim is not None:
        out["min_similarity"] = sim
    for name in ("min_width", "min_height"):
        if body.get(name) not in (None, ""):
            size = _int_field(body, (name,), 0, 0, 1 << 20)
            if size:
                out[name] = size
    return out


def _passes(row: dict, filters: dict) -> bool:
    if "language" in filters:
        lang = (row.get("LANGUAGE") or "none").lower()
        if lang != filters["language"]:
            return False
    if "min_similarity" in filters and row["score"] < filters["min_similarity"]:
        return False
    for name, column in (("min_width", "WIDTH"), ("min_height", "HEIGHT")):
        if name in filters and row.get(column) is not None and row[column] < filters[name]:
            return False   # rows without a size are kept (and marked size_known: false)
    return True


def _deduplicate(rows: list[dict]) -> list[dict]:
    """Drop repeats of a URL and near-identical hits (same caption, score within 1e-4): the
    common duplicate in web data is the same image re-hosted under the same alt-text."""
    seen_urls, seen_pairs, out = set(), [], []
    for r in rows:
        if r.get("URL") in seen_urls:
            continue
        if any(r.get("TEXT") == t and abs(r["score"] - s) < 1e-4 for t, s in seen_pairs):
            continue
        seen_urls.add(r.get("URL"))
        seen_pairs.append((r.get("TEXT"), r["score"]))
        out.append(r)
    return out


def _row_id(subset, raw_id: Any) -> int:
    """An index row id from a request: 400 when not an integer, 404 when outside the subset."""
    try:
        index_id = int(raw_id)
    except (TypeError, ValueError):
        raise ApiError(400, "id must be an integer") from None
    if not 0 <= index_id < subset.size:
        raise ApiError(404, f"id {index_id} out of range for {subset.name!r}")
    return index_id
