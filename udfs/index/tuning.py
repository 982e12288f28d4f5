"""How a kNN index meets `index.min_recall` within the query-time cap: the build knobs, exact
ground truth, graded recall, search-parameter tuning, and the recall fallback (exhaustive
fast-scan PQ with exact re-ranking) used first or when autofaiss's index misses the target.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from udfs.index import layout

log = logging.getLogger(__name__)


STRATEGIES = ("recall_first", "autofaiss_first")


@dataclass
class BuildParams:
    """The autofaiss knobs we expose, from the `index:` config section."""
    max_index_memory_usage: str = "4G"
    current_memory_available: str = "8G"
    max_index_query_time_ms: float = 10.0
    metric_type: str = "ip"
    index_key: str | None = None
    index_param: str | None = None
    min_nearest_neighbors_to_retrieve: int = 20
    nb_cores: int | None = None
    memory_mapped: bool = False
    distributed: bool = False
    temporary_indices_folder: str | None = None
    recall_sample: int = 1000
    recall_k: int = 10
    min_recall: float | None = 0.95
    recall_tuning_steps: int = 6
    recall_tuning_max_query_ms: float | None = 50.0
    recall_fallback: bool = True
    refine_k_factor: int = 32
    strategy: str = "recall_first"
    seed: int = 0

    @classmethod
    def from_config(cls, section: dict) -> "BuildParams":
        known = set(cls.__dataclass_fields__)
        params = cls(**{k: v for k, v in section.items() if k in known})
        params.check()
        return params

    def check(self) -> None:
        """Fail before building on budgets autofaiss would reject (it only logs and returns)."""
        from autofaiss.utils.cast import cast_memory_to_bytes

        try:
            current = cast_memory_to_bytes(str(self.current_memory_available))
            index_max = cast_memory_to_bytes(str(self.max_index_memory_usage))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"index memory sizes must look like '4G' or '512M': {exc}") from exc
        if current - index_max < 0.1 * current:
            raise ValueError(
                f"index.current_memory_available ({self.current_memory_available}) must leave "
                f"at least 10% beyond index.max_index_memory_usage ({self.max_index_memory_usage})")
        if self.metric_type not in ("ip", "l2"):
            raise ValueError(f"index.metric_type must be ip or l2, got {self.metric_type!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"index.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")


def _top_k_merge(d_acc, i_acc, d_new, i_new, k):
    d = np.concatenate([d_acc, d_new], axis=1)
    i = np.concatenate([i_acc, i_new], axis=1)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def exact_search(parts_vectors: Iterable[np.ndarray], queries: np.ndarray, k: int,
                 metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over vectors given part by part (so a big subset never sits in memory whole)."""
    import faiss

    n = len(queries)
    sign = 1.0 if metric == "ip" else -1.0
    d_acc = np.full((n, 0), -np.inf, np.float32)
    i_acc = np.full((n, 0), -1, np.int64)
    offset = 0
    for vectors in parts_vectors:
        if len(vectors) == 0:
            continue
        flat = faiss.IndexFlatIP(vectors.shape[1]) if metric == "ip" else faiss.IndexFlatL2(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        d, i = flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(vectors)))
        d_acc, i_acc = _top_k_merge(d_acc, i_acc, sign * d, i + offset, k)
        offset += len(vectors)
    return sign * d_acc, i_acc


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int,
                approx_scores: np.ndarray | None = None, kth_scores: np.ndarray | None = None,
                metric: str = "ip") -> float:
    """Mean over queries of (approximate top-k results that are true k nearest neighbours) / k.

    Without scores a result counts only when its id is in the exact top-k. With `approx_scores`
    (the exact score of each approximate result) and `kth_scores` (the exact k-th best score per
    query), a result also counts when it ties the k-th exact score (within float rounding): with
    repeated vectors (one caption embedded 400 times) the exact search lists an arbitrary 10 of the
    400 equal neighbours, and another 10 of them are as correct an answer. This is ann-benchmarks'
    distance-based recall. ids < 0 are misses; a NaN score (not looked up) never ties.
    """
    hits = []
    for q, (a, e) in enumerate(zip(approx_ids, exact_ids)):
        a, e = a[:k], e[:k]
        wanted = min(k, max(1, int((e >= 0).sum())))
        found = set(a[a >= 0]) & set(e[e >= 0])
        if approx_scores is not None and kth_scores is not None:
            kth = float(kth_scores[q])
            tol = TIE_TOLERANCE * max(1.0, abs(kth))
            for i, s in zip(a, approx_scores[q][:k]):
                ties = s >= kth - tol if metric == "ip" else s <= kth + tol
                if i >= 0 and i not in found and bool(ties):
                    found.add(i)
        hits.append(min(len(found), wanted) / wanted)
    return float(np.mean(hits)) if hits else float("nan")


# Relative float32 rounding allowed between the exact search's k-th score and a re-computed score
# of the same vector (BLAS and faiss's own kernels round differently, ~1e-7 at 512 dimensions).
TIE_TOLERANCE = 1e-5


@dataclass
class ExactNeighbours:
    """The ground truth of a recall measurement: exact top-k ids and scores of each query, and
    whether the (k+1)-th exact score ties the k-th (only then can a result outside the list be
    right, so only those queries need their results' scores looked up)."""
    ids: np.ndarray
    scores: np.ndarray
    metric: str = "ip"
    tied: np.ndarray | None = None

    @classmethod
    def from_search(cls, scores: np.ndarray, ids: np.ndarray, k: int, metric: str = "ip") -> "ExactNeighbours":
        """From an exact search for k+1 neighbours."""
        out = cls(ids[:, :k], scores[:, :k], metric)
        if ids.shape[1] > k:
            kth, nxt = out.kth, scores[:, k]
            tol = TIE_TOLERANCE * np.maximum(1.0, np.abs(kth))
            close = nxt >= kth - tol if metric == "ip" else nxt <= kth + tol
            out.tied = close & (ids[:, k] >= 0)
        else:  # fewer than k+1 vectors: every one is listed
            out.tied = np.zeros(len(ids), bool)
        return out

    @property
    def kth(self) -> np.ndarray:
        """The k-th best exact score of each query (the last listed one when fewer exist)."""
        last = np.maximum((self.ids >= 0).sum(axis=1) - 1, 0)
        return self.scores[np.arange(len(self.ids)), last]


def exact_vectors_of(index):
    """ids -> float32 vectors, when `index` keeps the exact vectors (flat, HNSW over flat storage,
    a flat re-ranking stage such as RFlat), else None (PQ codes only approximate them)."""
    import faiss

    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):
        inner = faiss.downcast_index(outer.refine_index)
    elif isinstance(outer, faiss.IndexHNSW):
        inner = faiss.downcast_index(outer.storage)
    else:
        inner = outer
    if not isinstance(inner, faiss.IndexFlat):
        return None
    return lambda ids: inner.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def part_vectors_of(parts: list[layout.EmbeddingPart], kind: str, storage_options: dict | None = None):
    """ids -> float32 vectors read from the parts (one pass per call), for indices that do not keep
    the exact vectors. graded_recall calls it only when some query's exact list ends in a tie, so
    never on distinct vectors."""
    def lookup(ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), 0), np.float32)
        offset = 0
        for part in parts:
            sel = np.nonzero((ids >= offset) & (ids < offset + part.rows))[0]
            if len(sel):
                vectors = layout.load_part(part, kind, storage_options)
                if out.shape[1] == 0:
                    out = np.zeros((len(ids), vectors.shape[1]), np.float32)
                out[sel] = vectors[ids[sel] - offset]
            offset += part.rows
        return out
    return lookup


def graded_recall(approx_ids: np.ndarray, queries: np.ndarray, exact: ExactNeighbours, k: int,
                  vectors=None) -> tuple[float, int]:
    """recall_at_k counting ties, and how many results counted only as ties. The exact scores of
    the results outside the exact id lists are computed from `vectors` (ids -> vectors); without
    it only ids count."""
    misses = []
    for q, (a, e) in enumerate(zip(approx_ids, exact.ids)):
        if exact.tied is not None and not exact.tied[q]:
            continue   # no exact neighbour beyond the list scores as well: a miss is a miss
        listed = set(e[:k])
        misses += [(q, j) for j, i in enumerate(a[:k]) if i >= 0 and i not in listed]
    strict = recall_at_k(approx_ids, exact.ids, k)
    if vectors is None or not misses:
        return strict, 0
    qs, js = np.array([m[0] for m in misses]), np.array([m[1] for m in misses])
    found = vectors(approx_ids[qs, js])
    if exact.metric == "ip":
        got = np.einsum("ij,ij->i", queries[qs], found)
    else:
        got = ((queries[qs] - found) ** 2).sum(axis=1)
    scores = np.full(approx_ids[:, :k].shape, np.nan, np.float32)
    scores[qs, js] = got
    with_ties = recall_at_k(approx_ids, exact.ids, k, scores, exact.kth, exact.metric)
    kth = exact.kth[qs]
    tol = TIE_TOLERANCE * np.maximum(1.0, np.abs(kth))
    ties = int((got >= kth - tol).sum() if exact.metric == "ip" else (got <= kth + tol).sum())
    return with_ties, ties


def sample_queries(parts: list[layout.EmbeddingPart], kind: str, sample: int, seed: int,
                   storage_options: dict | None = None) -> np.ndarray:
    """`sample` vectors drawn uniformly from the subset, used as queries (one pass over parts)."""
    total = sum(p.rows for p in parts)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(sample, total), replace=False))
    out, offset = [], 0
    for part in parts:
        sel = chosen[(chosen >= offset) & (chosen < offset + part.rows)] - offset
        if len(sel):
            out.append(layout.load_part(part, kind, storage_options)[sel])
        offset += part.rows
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def recall_ground_truth(parts: list[layout.EmbeddingPart], kind: str, sample: int, k: int, seed: int,
                        metric: str = "ip", storage_options: dict | None = None
                        ) -> tuple[np.ndarray, ExactNeighbours, float]:
    """`sample` of the subset's own vectors as queries (the queries a user sends are CLIP vectors
    from the same distribution), their exact top-k, and the seconds the exact search took."""
    queries = sample_queries(parts, kind, sample, seed, storage_options)
    if len(queries) == 0:
        return queries, ExactNeighbours(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), metric), 0.0
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    t0 = time.time()
    scores, ids = exact_search((layout.load_part(p, kind, storage_options) for p in parts), queries, k + 1, metric)
    return queries, ExactNeighbours.from_search(scores, ids, k, metric), time.time() - t0


def tune_recall(index, queries: np.ndarray, exact: ExactNeighbours, k: int,
                min_recall: float | None = None, tuning_steps: int = 0,
                index_param: str | None = None, max_query_ms: float | None = None,
                label: str = "autofaiss", vectors=None) -> dict:
    """Recall@k of `index` against the exact ids, widening its search parameters to `min_recall`.

    autofaiss tunes nprobe/efSearch for a query-time budget only, and on a busy machine its timing
    runs pick low values and recall drops (we measured 0.91 on random vectors). With `min_recall`
    set, the search parameters are doubled (up to `tuning_steps` times) until recall reaches it,
    unless a doubling would cost more than `max_query_ms` for one query (median of 50); the
    parameters used are returned as `index_param` (the starting ones as `{label}_index_param`).
    Results that tie the k-th exact score count as found (recall_at_k); their exact scores come
    from the index's own exact vectors when it keeps them, else from `vectors` (ids -> vectors).
    """
    if len(queries) == 0:
        return {f"recall@{k}": None, "recall_queries": 0}
    vectors = exact_vectors_of(index) or vectors
    t1 = time.time()
    _, approx = index.search(queries, k)
    t2 = time.time()
    recall, ties = graded_recall(approx, queries, exact, k, vectors)
    out: dict[str, Any] = {"recall_queries": len(queries)}
    param = index_param
    if min_recall is not None and recall < min_recall and index_param:
        out[f"{label}_index_param"] = index_param
        out[f"{label}_recall@{k}"] = round(recall, 4)
        for _ in range(int(tuning_steps)):
            wider = scale_search_param(index, param, 2)
            if wider is None:
                break
            layout.apply_index_param(index, wider)
            # the cap first (50 single queries), so that a too-slow setting never runs the batch
            ms = single_query_ms(index, queries[:50], k)  # as served: one query at a time
            if max_query_ms is not None and ms > max_query_ms:
                layout.apply_index_param(index, param)  # keep the last parameters within the cap
                out["recall_tuning_stopped"] = (f"{wider} would take {ms:.1f} ms per query "
                                                f"(cap index.recall_tuning_max_query_ms={max_query_ms})")
                break
            t3 = time.time()
            _, wider_approx = index.search(queries, k)
            t4 = time.time()
            param, t1, t2 = wider, t3, t4
            recall, ties = graded_recall(wider_approx, queries, exact, k, vectors)
            log.info("search parameters %s: recall@%d %.4f, %.2f ms per query", param, k, recall, ms)
            if recall >= min_recall:
                break
    if param:
        out["index_param"] = param
    out[f"recall@{k}"] = round(recall, 4)
    out[f"recall_ties@{k}"] = ties  # results outside the exact id lists that tie the k-th score
    out["recall_index_ms_per_query"] = round(1000 * (t2 - t1) / len(queries), 4)
    return out


def measure_recall(index, parts: list[layout.EmbeddingPart], kind: str, sample: int, k: int, seed: int,
                   metric: str = "ip", storage_options: dict | None = None,
                   min_recall: float | None = None, tuning_steps: int = 0,
                   index_param: str | None = None, max_query_ms: float | None = None) -> dict:
    """recall_ground_truth + tune_recall, for an index that is already built."""
    queries, exact, seconds = recall_ground_truth(parts, kind, sample, k, seed, metric, storage_options)
    out = tune_recall(index, queries, exact, k, min_recall, tuning_steps, index_param, max_query_ms,
                      vectors=part_vectors_of(parts, kind, storage_options))
    if len(queries):
        out["recall_exact_seconds"] = round(seconds, 3)
    return out


def single_query_ms(index, queries: np.ndarray, k: int) -> float:
    """Median latency of one-at-a-time searches (a batch spreads over cores and hides it)."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q.reshape(1, -1), k)
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times)) if times else 0.0


def scale_search_param(index, index_param: str, factor: int) -> str | None:
    """`efSearch=78` -> `efSearch=156` (also nprobe, and k_factor_rf of a re-ranking index); nprobe
    is capped at the number of lists. None when nothing can grow."""
    import faiss

    items, changed = [], False
    for item in index_param.split(","):
        name, _, value = item.partition("=")
        if name in ("efSearch", "nprobe", "k_factor_rf") and value.isdigit():
            cap = 1 << 15
            if name == "nprobe":
                try:
                    cap = faiss.extract_index_ivf(index).nlist
                except RuntimeError:
                    pass
            new = min(int(value) * factor, cap)
            changed |= new != int(value)
            items.append(f"{name}={new}")
        else:
            items.append(item)
    return ",".join(items) if changed else None


def recall_first(parts: list[layout.EmbeddingPart], kind: str, queries: np.ndarray, exact: ExactNeighbours,
                 local_index: str, params: BuildParams, storage_options: dict | None = None) -> dict:
    """Try the fast-scan re-ranking index before autofaiss. Returns its infos with `chosen_by` (it
    is written to `local_index`) or, when it is not kept, why (`status`, `reason`)."""
    k = params.recall_k
    total = sum(p.rows for p in parts)
    dim = int(queries.shape[1]) if len(queries) else layout._npy_rows_dim(parts[0].image_npy, storage_options)[1]
    refusal = None
    if params.index_key or params.index_param:
        refusal = "index.index_key / index.index_param set: autofaiss builds what they name"
    elif params.min_recall is None or len(queries) == 0:
        refusal = "no recall goal to measure (index.min_recall null or no queries)"
    else:
        refusal = _fallback_refusal(params, total, dim, needs_switch=False)
    if refusal:
        return {"status": "skipped", "reason": refusal}
    t0 = time.time()
    try:
        index = build_refine_index(parts, kind, dim, params.metric_type, seed=params.seed,
                                   storage_options=storage_options)
    except RuntimeError as exc:
        return {"status": "failed", "reason": str(exc)[:300]}
    build_seconds = time.time() - t0
    fig = _tuned_refine_figures(index, queries, exact, params, total, dim, build_seconds)
    recall, cap = fig[f"recall@{k}"], params.recall_tuning_max_query_ms
    within_cap = cap is None or fig["single_query_ms"] <= cap
    if recall < params.min_recall or not within_cap:
        return {"status": "not kept", "within_cap": within_cap, **fig,
                "reason": (f"recall@{k} {recall} at {fig['single_query_ms']:.1f} ms per query "
                           f"(goal {params.min_recall} within {cap} ms)")}
    import faiss

    faiss.write_index(index, local_index)
    fig["size in bytes"] = os.path.getsize(local_index)
    return {**fig, "nb vectors": total, "dim": dim, "avg_search_speed_ms": fig["single_query_ms"],
            "chosen_by": (f"recall first: {fig['index_key']} reached recall@{k} {recall} >= index.min_recall="
                          f"{params.min_recall} at {fig['single_query_ms']:.1f} ms per query (cap {cap} ms); "
                          "autofaiss not run")}


def _refine_subquantizers(dim: int) -> int:
    return dim // 2 if dim % 2 == 0 else dim


def refine_index_key(dim: int) -> str:
    """4-bit PQ with two dimensions per sub-quantizer, scanned with faiss's SIMD fast-scan over
    all vectors, whose top k x k_factor_rf candidates are re-ranked with the exact vectors."""
    return f"PQ{_refine_subquantizers(dim)}x4fs,RFlat"


def refine_index_bytes(nb_vectors: int, dim: int) -> int:
    """The exact vectors (float32) plus 4 bits per sub-quantizer."""
    return nb_vectors * (4 * dim + (_refine_subquantizers(dim) + 1) // 2)


def build_refine_index(parts: list[layout.EmbeddingPart], kind: str, dim: int, metric: str = "ip",
                       train_size: int = 65536, seed: int = 0,
                       storage_options: dict | None = None):
    """The re-ranking index over all parts, in one pass: the first parts are held until
    `train_size` rows are seen, the PQ is trained on a random draw of them, then every part is
    added (parts are download shards in uid-hash order, so the first ones are a fair sample)."""
    import faiss

    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(dim, refine_index_key(dim), metric_type)
    held: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for part in parts:
        vectors = np.ascontiguousarray(layout.load_part(part, kind, storage_options), dtype=np.float32)
        if index.is_trained:
            index.add(vectors)
            continue
        held.append(vectors)
        if sum(len(v) for v in held) >= train_size or part is parts[-1]:
            pool = np.concatenate(held)
            pick = rng.choice(len(pool), size=min(train_size, len(pool)), replace=False)
            index.train(pool[np.sort(pick)])
            for v in held:
                index.add(v)
            held.clear()
    return index


def _tuned_refine_figures(index, queries: np.ndarray, exact: ExactNeighbours, params: BuildParams,
                          total: int, dim: int, build_seconds: float) -> dict:
    """Recall of the re-ranking index with k_factor_rf widened toward the goal, and its latency."""
    start = f"k_factor_rf={int(params.refine_k_factor)}"
    layout.apply_index_param(index, start)
    tuned = tune_recall(index, queries, exact, params.recall_k, params.min_recall, params.recall_tuning_steps,
                        start, params.recall_tuning_max_query_ms, label="refine")
    ms = single_query_ms(index, queries[:50], params.recall_k)
    return {"index_key": refine_index_key(dim), **tuned, "single_query_ms": round(ms, 3),
            "size in bytes": refine_index_bytes(total, dim), "build_seconds": round(build_seconds, 3)}


def _fallback_refusal(params: BuildParams, nb_vectors: int, dim: int, needs_switch: bool = True) -> str | None:
    from autofaiss.utils.cast import cast_memory_to_bytes

    if needs_switch and not params.recall_fallback:
        return "off (index.recall_fallback=false)"
    if params.memory_mapped or params.distributed:
        return "not with index.memory_mapped or index.distributed (the index holds every vector in RAM)"
    size, budget = refine_index_bytes(nb_vectors, dim), cast_memory_to_bytes(str(params.max_index_memory_usage))
    if size > budget:
        return (f"{refine_index_key(dim)} needs {size / 2**30:.2f} GiB, over "
                f"index.max_index_memory_usage={params.max_index_memory_usage}")
    return None


def recall_fallback(parts: list[layout.EmbeddingPart], kind: str, dim: int, queries: np.ndarray,
                    exact: ExactNeighbours, local_index: str, kind_infos: dict, params: BuildParams,
                    storage_options: dict | None = None) -> dict:
    """autofaiss's index missed `min_recall` within the query-time cap (HNSW and IVF lose recall
    on data without cluster structure). Build an exhaustive fast-scan PQ index with exact
    re-ranking: its recall depends on k_factor_rf, not on the data's structure, it builds in
    seconds, and its memory is the raw vectors plus dim/4 bytes each, less than HNSW32's. It
    replaces autofaiss's index at `local_index` when its recall is higher within the cap; either
    way the other's figures stay in the infos."""
    import faiss

    k = params.recall_k
    total = sum(p.rows for p in parts)
    refusal = _fallback_refusal(params, total, dim)
    if refusal:
        return {**kind_infos, "recall_fallback": {"status": "skipped", "reason": refusal}}
    key = refine_index_key(dim)
    log.info("%s index: recall@%d %.4f below index.min_recall=%s; building %s", kind, k,
             kind_infos[f"recall@{k}"], params.min_recall, key)
    t0 = time.time()
    try:
        index = build_refine_index(parts, kind, dim, params.metric_type, seed=params.seed,
                                   storage_options=storage_options)
    except RuntimeError as exc:  # faiss refuses, e.g. too few vectors to train 16 centroids
        return {**kind_infos, "recall_fallback": {"status": "failed", "reason": str(exc)[:300]}}
    build_seconds = time.time() - t0
    fallback = _tuned_refine_figures(index, queries, exact, params, total, dim, build_seconds)
    tuned, ms = fallback, fallback["single_query_ms"]
    cap = params.recall_tuning_max_query_ms
    within_cap = cap is None or ms <= cap
    if not (within_cap and tuned[f"recall@{k}"] > kind_infos[f"recall@{k}"]):
        why = (f"kept autofaiss's index: {key} reached recall@{k} {tuned[f'recall@{k}']} at "
               f"{ms:.1f} ms per query")
        return {**kind_infos, "recall_fallback": {"status": "not better", "reason": why, **fallback}}
    faiss.write_index(index, local_index)
    fallback["size in bytes"] = os.path.getsize(local_index)
    return {**fallback, "nb vectors": total, "avg_search_speed_ms": round(ms, 3),
            "build_seconds": round(kind_infos.get("build_seconds", 0) + build_seconds, 3),
            "recall_exact_seconds": kind_infos.get("recall_exact_seconds"),
            "chosen_by": (f"recall fallback: autofaiss's {kind_infos.get('index_key')} reached "
                          f"recall@{k} {kind_infos[f'recall@{k}']} < index.min_recall="
                          f"{params.min_recall}"),
            "autofaiss": kind_infos}
