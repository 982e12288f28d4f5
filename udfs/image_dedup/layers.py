"""Rules of the image dedup layers, Spark-free: which copy is kept, how hashes are banded, union-find
components, and SemDeDup inside one k-means cluster.

`spark_jobs/image_dedup.py` runs the exact and pHash layers as DataFrame joins with the same rules;
the functions here are the reference the tests compare it with, what the benchmark runs on
generated images, and (SemDeDup) what the filter stage calls once per cluster.

Rules:
- exact (same sha256 of the original bytes): keep the earliest `record_date` (a missing date sorts
  last), then the smallest `uid`, then the smallest sample `key` (a uid may repeat across crawls).
- near (pHash Hamming distance <= image_dedup.phash_distance, transitively: connected components):
  keep the largest original_width x original_height, then the exact rule.
- semantic (cosine > 1 - eps inside a cluster): visit the cluster's rows from the one closest to the
  centroid outwards; a row is dropped when it is that close to a row already kept (named as the kept
  key), else kept. This is SemDeDup's "keep the one nearest the centroid" made greedy, so every
  dropped row points at a row that survives (the paper also drops a row whose only close
  neighbour was itself dropped).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from udfs.download.image_hash import as_uint64, hamming_matrix, to_unsigned

DUPLICATE_IMAGE = "duplicate_image"
NEAR_DUPLICATE = "near_duplicate"
SEMANTIC_DUPLICATE = "semantic_duplicate"
EVAL_OVERLAP = "eval_overlap"
LAYER_STATUSES = (DUPLICATE_IMAGE, NEAR_DUPLICATE, SEMANTIC_DUPLICATE, EVAL_OVERLAP)


# --- which copy is kept ----------------------------------------------------------------------------

def exact_rank(record_date: str | None, uid: str | None, key: str | None = None) -> tuple:
    """Sort key of the exact rule: smallest wins."""
    return (record_date is None, record_date or "", uid or "", key or "")


def near_rank(width: int | None, height: int | None, record_date: str | None, uid: str | None,
              key: str | None = None) -> tuple:
    """Sort key of the near-duplicate rule: largest area, then the exact rule."""
    return (-(int(width or 0) * int(height or 0)), *exact_rank(record_date, uid, key))


def exact_message(kept_uid: str, kept_key: str, sha256: str) -> str:
    return f"same sha256 {sha256[:16]} as kept uid {kept_uid} (key {kept_key})"


def near_message(kept_uid: str, kept_key: str, distance: int) -> str:
    return f"phash distance {distance} to kept uid {kept_uid} (key {kept_key})"


def semantic_message(kept_uid: str, kept_key: str, cosine: float) -> str:
    return f"cosine {cosine:.4f} to kept uid {kept_uid} (key {kept_key})"


# --- bands -----------------------------------------------------------------------------------------

def band_layout(bands: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, width) of each band: `bands` near-equal slices of the hash, top bits first.

    Two hashes within Hamming distance d agree exactly on at least one of d + 1 bands
    (pigeonhole), so a join on equal band values finds every pair with d <= bands - 1; pairs
    further apart are found only when their differing bits leave a band untouched."""
    if not 1 <= bands <= bits:
        raise ValueError(f"bands must be in 1..{bits}, got {bands}")
    widths = [bits // bands + (1 if i < bits % bands else 0) for i in range(bands)]
    layout, top = [], bits
    for w in widths:
        top -= w
        layout.append((top, w))
    return layout


def band_values(h: int, bands: int) -> list[int]:
    u = to_unsigned(int(h))
    return [(u >> shift) & ((1 << width) - 1) for shift, width in band_layout(bands)]


# --- components ------------------------------------------------------------------------------------

class UnionFind:
    """Disjoint sets over arbitrary hashable items (path halving, union by size)."""

    def __init__(self, items: Iterable = ()):
        self.parent: dict = {}
        self.size: dict = {}
        for item in items:
            self.add(item)

    def add(self, item) -> None:
        if item not in self.parent:
            self.parent[item] = item
            self.size[item] = 1

    def find(self, item):
        self.add(item)
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def groups(self) -> list[list]:
        out: dict = {}
        for item in self.parent:
            out.setdefault(self.find(item), []).append(item)
        return list(out.values())


def near_pairs(hashes: Sequence[int], distance: int, bands: int | None = None,
               block: int = 2048) -> list[tuple[int, int, int]]:
    """(i, j, d) with i < j and Hamming distance d <= `distance`.

    bands=None compares all pairs (blocked numpy; the ground truth of the benchmark); an int
    compares only pairs that share a band value, as the Spark stage does."""
    h = as_uint64(hashes)
    out: list[tuple[int, int, int]] = []
    if bands is None:
        for start in range(0, len(h), block):
            d = hamming_matrix(h[start:start + block], h)
            ii, jj = np.nonzero(d <= distance)
            for i, j in zip(ii + start, jj):
                if i < j:
                    out.append((int(i), int(j), int(d[i - start, j])))
        return out
    candidates: set[tuple[int, int]] = set()
    for shift, width in band_layout(bands):
        values = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        buckets: dict[int, list[int]] = {}
        for i, v in enumerate(values.tolist()):
            buckets.setdefault(v, []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    candidates.add((members[x], members[y]))
    for i, j in sorted(candidates):
        d = int((int(h[i]) ^ int(h[j])).bit_count())
        if d <= distance:
            out.append((i, j, d))
    return out


_POP16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def _popcount16(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 by a 16-bit lookup table (numpy<2 has no bitwise_count; this is
    ~3x faster than image_hash.popcount's byte table, and the pairs of a bucket are many)."""
    q = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint16).reshape(-1, 4)
    return (_POP16[q[:, 0]].astype(np.int8) + _POP16[q[:, 1]] + _POP16[q[:, 2]] + _POP16[q[:, 3]])


def _chunk_masks(band_mask: int, distance: int, bits: int = 64) -> list[int]:
    """Masks that split the bits outside a band into distance + 1 parts (one all-zero mask when
    there are fewer bits than that). Two hashes that share the band and differ in <= distance
    bits agree on at least one part (pigeonhole), so comparing only rows that also share a part
    finds every such pair, at a fraction of the bucket's pairs."""
    free = [b for b in range(bits) if not (band_mask >> b) & 1]
    parts = distance + 1
    if len(free) < parts:
        return [0]
    out = []
    for c in range(parts):
        lo, hi = len(free) * c // parts, len(free) * (c + 1) // parts
        out.append(sum(1 << b for b in free[lo:hi]))
    return out


def bucket_pairs(nodes, hashes, band: int, bands: int, distance: int, big: int = 2048,
                 block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verified near pairs among rows that share a value of band `band`: (a, b, d) arrays, a < b
    (node ids), d = Hamming distance <= `distance`; each pair comes out once, from the first band
    it shares, so over all bands this is `near_pairs(hashes, distance, bands)` without duplicates.

    What the Spark stage runs per group of buckets (`groupBy(band, group).applyInPandas`). The
    bits outside the band are split into distance + 1 parts (`_chunk_masks`); for each part the
    rows are sorted by (band value, part) and only rows with both equal are compared, by offset
    (row i with i + k, k = 1, 2, ..., vectorised over the group: work = the pairs compared). A
    pair is emitted by its first shared part. Runs longer than `big` rows (many hashes sharing a
    band value and a part, e.g. near-blank images) are compared in `block` x `block` tiles, so
    memory stays O(block^2) whatever the run's size."""
    n = np.asarray(nodes, dtype=np.int64)
    h = as_uint64(np.asarray(hashes))
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int16))
    if len(h) < 2:
        return empty
    layout = band_layout(bands)
    earlier = [((1 << w) - 1) << s for s, w in layout[:band]]
    shift, width = layout[band]
    band_mask = ((1 << width) - 1) << shift
    parts = _chunk_masks(band_mask, distance)
    out_a, out_b, out_d = [], [], []
    for c, part in enumerate(parts):
        keys = h & np.uint64(band_mask | part)
        order = np.argsort(keys, kind="stable")
        k_sorted, hs = keys[order], h[order]
        in_big = None
        pi, pj = [], []
        if len(k_sorted) > big and (k_sorted[big:] == k_sorted[:-big]).any():   # a run longer than big
            starts = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
            lengths = np.diff(np.r_[starts, len(k_sorted)])
            in_big = np.repeat(lengths > big, lengths)
            for s, m in zip(starts[lengths > big], lengths[lengths > big]):
                for r0 in range(s, s + m, block):
                    rows = np.arange(r0, min(r0 + block, s + m))
                    for c0 in range(r0, s + m, block):
                        cols = np.arange(c0, min(c0 + block, s + m))
                        ii, jj = np.meshgrid(rows, cols, indexing="ij")
                        upper = jj > ii
                        pi.append(ii[upper])
                        pj.append(jj[upper])
        # runs are contiguous: when no two rows k apart share a key, none further apart do
        for k in range(1, min(big, len(k_sorted) - 1) + 1):
            same = k_sorted[k:] == k_sorted[:-k]
            if in_big is not None:
                same &= ~in_big[k:]
            i = np.flatnonzero(same)
            if not len(i):
                break
            pi.append(i)
            pj.append(i + k)
        if not pi:
            continue
        i, j = np.concatenate(pi), np.concatenate(pj)
        x = hs[i] ^ hs[j]
        d = _popcount16(x)
        sel = d <= distance
        x, i, j, d = x[sel], i[sel], j[sel], d[sel]
        first = np.ones(len(x), dtype=bool)
        for mask in earlier + parts[:c]:   # shared an earlier band or part: emitted there
            first &= (x & np.uint64(mask)) != 0
        a, b = n[order[i[first]]], n[order[j[first]]]
        out_a.append(np.minimum(a, b))
        out_b.append(np.maximum(a, b))
        out_d.append(d[first].astype(np.int16))
    if not out_a:
        return empty
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d)


def components(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Component label (smallest member index) of each of n items."""
    uf = UnionFind(range(n))
    for a, b, *_ in pairs:
        uf.union(a, b)
    label = list(range(n))
    for group in uf.groups():
        low = min(group)
        for item in group:
            label[item] = low
    return label


# --- SemDeDup in one cluster -----------------------------------------------------------------------

def semdedup_cluster(emb: np.ndarray, centroid: np.ndarray, eps: float,
                     block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy SemDeDup of one cluster's L2-normalised embeddings [n, d].

    Returns (kept_by [n] int: -1 for a kept row, else the index of the kept row it duplicates;
    cosine [n] float: the cosine to that row, NaN when kept; order [n]: the visiting order).
    Rows are visited by decreasing cosine to the centroid (ties: input order). Memory is
    O(block x n): the cluster is compared block by block against the rows kept so far."""
    emb = np.asarray(emb, dtype=np.float32)
    n = len(emb)
    kept_by = np.full(n, -1, dtype=np.int64)
    cosine = np.full(n, np.nan, dtype=np.float64)
    if n == 0:
        return kept_by, cosine, np.zeros(0, dtype=np.int64)
    threshold = 1.0 - float(eps)
    order = np.argsort(-(emb @ np.asarray(centroid, dtype=np.float32)), kind="stable")
    kept: list[int] = []
    for start in range(0, n, block):
        idx = order[start:start + block]
        sims_prev = emb[idx] @ emb[kept].T if kept else np.zeros((len(idx), 0), np.float32)
        sims_block = emb[idx] @ emb[idx].T
        newly: list[int] = []   # positions within this block kept so far
        for p, row in enumerate(idx):
            best, best_sim = -1, -np.inf
            if sims_prev.shape[1]:
                q = int(np.argmax(sims_prev[p]))
                best, best_sim = kept[q], float(sims_prev[p, q])
            if newly:
                cand = sims_block[p, newly]
                q = int(np.argmax(cand))
                if float(cand[q]) > best_sim:
                    best, best_sim = int(idx[newly[q]]), float(cand[q])
            if best >= 0 and best_sim > threshold:
                kept_by[row] = best
                cosine[row] = best_sim
            else:
                newly.append(p)
        kept.extend(int(idx[p]) for p in newly)
    return kept_by, cosine, order


# --- eval-set decontamination ----------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
EVAL_EMBEDDINGS = "embeddings.npy"
EVAL_IDS = "ids.txt"


class EvalSetError(ValueError):
    """filter.eval_images points at nothing usable."""


class EvalSet:
    """The eval items a row may not match: pHashes of the folder's images (named by file name) and
    L2-normalised embeddings from `embeddings.npy` with their names in `ids.txt` (one per line)."""

    def __init__(self, hash_ids: list[str], hashes: np.ndarray, emb_ids: list[str], emb: np.ndarray | None):
        self.hash_ids, self.hashes, self.emb_ids, self.emb = hash_ids, hashes, emb_ids, emb

    def __len__(self) -> int:
        return len(self.hash_ids) + len(self.emb_ids)

    def matches(self, phashes, embeddings: np.ndarray | None, max_distance: int,
                min_cosine: float) -> list[str | None]:
        """One message per row (None: no overlap). pHash first (nearest item), then embeddings
        (most similar item). `phashes`: signed hashes or None; `embeddings`: [n, d] or None."""
        n = len(phashes)
        out: list[str | None] = [None] * n
        have = [i for i, h in enumerate(phashes) if h is not None and not (isinstance(h, float) and np.isnan(h))]
        if have and len(self.hashes):
            d = hamming_matrix([int(phashes[i]) for i in have], self.hashes)
            best = d.argmin(axis=1)
            for row, j, dist in zip(have, best, d[np.arange(len(have)), best]):
                if dist <= max_distance:
                    out[row] = f"eval item {self.hash_ids[j]}: phash distance {int(dist)}"
        if embeddings is not None and self.emb is not None and len(embeddings):
            if embeddings.shape[1] != self.emb.shape[1]:
                raise EvalSetError(f"eval embeddings have dimension {self.emb.shape[1]}, "
                                   f"the rows' image embeddings {embeddings.shape[1]}")
            sims = embeddings @ self.emb.T
            best = sims.argmax(axis=1)
            for row, (j, s) in enumerate(zip(best, sims[np.arange(n), best])):
                if out[row] is None and s >= min_cosine:
                    out[row] = f"eval item {self.emb_ids[j]}: cosine {float(s):.4f}"
        return out


def load_eval_set(uri: str, storage_options: dict | None = None) -> EvalSet:
    from udfs import fsio
    from udfs.clip import embeddings
    from udfs.download.image_hash import phash_bytes

    if not fsio.exists(uri, storage_options):
        raise EvalSetError(f"filter.eval_images: {uri} not found")
    files = sorted(fsio.expand([fsio.join(uri, "*")], storage_options))
    hash_ids, hashes = [], []
    for f in files:
        name = f.rstrip("/").rsplit("/", 1)[-1]
        if name.lower().endswith(IMAGE_SUFFIXES):
            with fsio.open_uri(f, "rb", storage_options) as fh:
                h = phash_bytes(fh.read())
            if h is None:
                raise EvalSetError(f"filter.eval_images: {f} does not decode as an image")
            hash_ids.append(name)
            hashes.append(h)
    emb_ids: list[str] = []
    emb = None
    npy = fsio.join(uri, EVAL_EMBEDDINGS)
    if fsio.exists(npy, storage_options):
        emb = np.asarray(embeddings.read_npy(npy, storage_options), dtype=np.float32)
        ids_uri = fsio.join(uri, EVAL_IDS)
        if not fsio.exists(ids_uri, storage_options):
            raise EvalSetError(f"filter.eval_images: {npy} needs its ids in {ids_uri} (one per line)")
        with fsio.open_uri(ids_uri, "rb", storage_options) as fh:
            emb_ids = [line.strip() for line in fh.read().decode("utf-8").splitlines() if line.strip()]
        if emb.ndim != 2 or len(emb_ids) != len(emb):
            raise EvalSetError(f"filter.eval_images: {npy} has shape {emb.shape} but {ids_uri} "
                               f"{len(emb_ids)} ids")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    if not hash_ids and not emb_ids:
        raise EvalSetError(f"filter.eval_images: {uri} holds no images and no {EVAL_EMBEDDINGS}")
    return EvalSet(hash_ids, as_uint64(hashes) if hashes else np.zeros(0, np.uint64), emb_ids, emb)


_EVAL_CACHE: dict[tuple[str, str], EvalSet] = {}


def cached_eval_set(uri: str, storage_options: dict | None = None, token: str = "") -> EvalSet:
    """One load per Python worker and run (`token`)."""
    if (uri, token) not in _EVAL_CACHE:
        _EVAL_CACHE.clear()
        _EVAL_CACHE[(uri, token)] = load_eval_set(uri, storage_options)
    return _EVAL_CACHE[(uri, token)]


_CENTROIDS: dict[str, object] = {}


def cached_centroids(uri: str, storage_options: dict | None = None):
    """A faiss inner-product index over the k-means centroids at `uri`, one per Python worker."""
    if uri not in _CENTROIDS:
        _CENTROIDS.clear()
        import faiss

        from udfs.clip import embeddings

        c = np.ascontiguousarray(embeddings.read_npy(uri, storage_options), dtype=np.float32)
        index = faiss.IndexFlatIP(c.shape[1])
        index.add(c)
        _CENTROIDS[uri] = index
    return _CENTROIDS[uri]
