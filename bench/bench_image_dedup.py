"""image-dedup benchmark: how well each layer finds copies of an image, what the hash costs, and how
the banded join and SemDeDup scale.

1. near: 1,000 base photos (tests/gen/photos.py, JPEG q90) with 5 edited copies each (50% resize,
   JPEG q30, 5% crop, +10% brightness, a small caption overlay) plus one byte-identical copy, and
   5,000 distinct photos: 12,000 images. They are hashed in this process with the function
   `download` calls (`udfs.download.image_hash.phash_bytes`), not fetched through a loopback server: the
   server would add nothing to what is measured. Precision and recall are over pairs of images
   that end in one group (connected components), for the exact layer (sha256), the pHash layer at
   several distances (all pairs, and the 4-band join the stage uses), both, and dHash.
2. hash: speed and agreement of our numpy pHash against `imagehash` (when importable; it is not a
   project dependency), and of the 1/8-scale JPEG decode against a full decode.
3. scale: the stage's banded pairs (grouped verification) + connected components on synthetic
   hashes (Spark, local[2]): seconds, verified pairs, the pairs sharing a band value, and shuffle
   bytes (Spark's REST API on loopback) per size, and the growth from the first size to the last.
4. semdedup: k-means (faiss) + per-cluster SemDeDup on N x 512 random clustered vectors: seconds
   and peak RSS, in one process (`semdedup`) and through the filter stage's Spark plan
   (`semdedup-spark`: per cluster in applyInPandas; peak RSS of driver + JVM + workers).

    python -m bench.bench_image_dedup --part near,hash
    python -m bench.bench_image_dedup --part scale --sizes 2000000,10000000
    python -m bench.bench_image_dedup --part semdedup --rows 1000000
    python -m bench.bench_image_dedup --part semdedup-spark --rows 200000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np

DISTANCES = (0, 2, 4, 6, 8, 10, 12, 14, 16)


# --- 1. near-duplicate quality ---------------------------------------------------------------------

def make_images(n_base: int, n_distinct: int):
    """[(group, kind, bytes)]: group = the base's index for the base and its copies, -1 - i for
    the distinct images."""
    from tests.gen.photos import TRANSFORMS, jpeg, photo_like, transform

    items = []
    rng = np.random.default_rng(0)
    for g in range(n_base):
        size = (int(rng.integers(280, 480)), int(rng.integers(220, 360)))
        img = photo_like(g, size)
        base = jpeg(img)
        items.append((g, "base", base))
        items.append((g, "identical", base))
        for t in TRANSFORMS:
            items.append((g, t, transform(img, t, seed=g)))
    for i in range(n_distinct):
        size = (int(rng.integers(280, 480)), int(rng.integers(220, 360)))
        items.append((-1 - i, "distinct", jpeg(photo_like(1_000_000 + i, size))))
    return items


def _groups_metrics(groups: list[int], labels: list[int], kinds: list[str]) -> dict:
    """Pair precision / recall of predicted components `labels` against true `groups`, and the
    recall of each copy kind (the copy is in its base's component)."""
    from collections import Counter

    def pairs_in(counter):
        return sum(c * (c - 1) // 2 for c in counter.values())

    tp = pairs_in(Counter(zip(labels, groups)))
    pred = pairs_in(Counter(labels))
    true = pairs_in(Counter(groups))
    base_label = {g: lab for g, lab, k in zip(groups, labels, kinds) if k == "base"}
    per_kind: dict[str, list[bool]] = {}
    for g, lab, k in zip(groups, labels, kinds):
        if k not in ("base", "distinct"):
            per_kind.setdefault(k, []).append(base_label[g] == lab)
    return {"precision": round(tp / pred, 4) if pred else 1.0, "recall": round(tp / true, 4) if true else 1.0,
            "predicted_pairs": pred, "true_pairs": true,
            "recall_by_transform": {k: round(sum(v) / len(v), 4) for k, v in per_kind.items()}}


def near_quality(n_base: int = 1000, n_distinct: int = 5000) -> dict:
    from udfs.download import image_hash as ih
    from udfs.image_dedup import layers as dd

    t0 = time.perf_counter()
    items = make_images(n_base, n_distinct)
    gen_s = time.perf_counter() - t0
    groups = [g for g, _, _ in items]
    kinds = [k for _, k, _ in items]
    t0 = time.perf_counter()
    ph = [ih.phash_bytes(b) for _, _, b in items]
    hash_s = time.perf_counter() - t0
    dh = [ih.dhash(ih.open_for_hash(b)) for _, _, b in items]
    shas = [hashlib.sha256(b).hexdigest() for _, _, b in items]
    n = len(items)
    out: dict = {"images": n, "generate_seconds": round(gen_s, 1),
                 "phash_ms_per_image": round(1000 * hash_s / n, 3)}

    exact_pairs = []
    first: dict[str, int] = {}
    for i, s in enumerate(shas):
        if s in first:
            exact_pairs.append((first[s], i))
        else:
            first[s] = i
    out["exact"] = _groups_metrics(groups, dd.components(n, exact_pairs), kinds)
    all_pairs = dd.near_pairs(ph, max(DISTANCES))
    dh_pairs = dd.near_pairs(dh, max(DISTANCES))
    out["phash"], out["phash_4_bands"], out["phash_and_exact"], out["dhash"] = {}, {}, {}, {}
    for d in DISTANCES:
        sel = [(a, b) for a, b, x in all_pairs if x <= d]
        out["phash"][d] = _groups_metrics(groups, dd.components(n, sel), kinds)
        out["phash_and_exact"][d] = _groups_metrics(groups, dd.components(n, sel + exact_pairs), kinds)
        out["dhash"][d] = _groups_metrics(groups, dd.components(n, [(a, b) for a, b, x in dh_pairs if x <= d]),
                                          kinds)
    for d in (4, 6, 8):
        banded = dd.near_pairs(ph, d, bands=4)
        out["phash_4_bands"][d] = _groups_metrics(groups, dd.components(n, banded + exact_pairs), kinds)
    # distance of each copy to its base, to say what crop and overlay would need
    base_hash = {g: h for g, k, h in zip(groups, kinds, ph) if k == "base"}
    dist: dict[str, list[int]] = {}
    for g, k, h in zip(groups, kinds, ph):
        if k not in ("base", "distinct"):
            dist.setdefault(k, []).append(ih.hamming(h, base_hash[g]))
    out["copy_distance_percentiles"] = {k: {p: int(np.percentile(v, p)) for p in (50, 90, 95, 99, 100)}
                                        for k, v in dist.items()}
    distinct_idx = [i for i, k in enumerate(kinds) if k in ("base", "distinct")]
    hm = ih.hamming_matrix([ph[i] for i in distinct_idx[:3000]], [ph[i] for i in distinct_idx[:3000]])
    iu = np.triu_indices(len(hm), 1)
    out["unrelated_distance_percentiles"] = {p: float(np.percentile(hm[iu], p)) for p in (0.001, 0.01, 0.1, 1, 50)}
    out["unrelated_min_distance"] = int(hm[iu].min())
    return out


# --- 2. hash speed and agreement -------------------------------------------------------------------

def hash_speed(n: int = 300) -> dict:
    import io

    from PIL import Image

    from tests.gen.photos import jpeg, photo_like
    from udfs.download import image_hash as ih

    data = [jpeg(photo_like(i, (1024, 768))) for i in range(n)]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in data]
    out: dict = {"images": n, "size": "1024x768 JPEG q90"}
    t0 = time.perf_counter()
    ours = [ih.phash(im) for im in decoded]
    out["numpy_phash_ms"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    t0 = time.perf_counter()
    draft = [ih.phash_bytes(b) for b in data]
    out["phash_bytes_ms_incl_draft_decode"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    t0 = time.perf_counter()
    for b in data:
        Image.open(io.BytesIO(b)).convert("RGB")
    out["full_decode_ms"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    d = [ih.hamming(a, b) for a, b in zip(ours, draft)]
    out["draft_vs_full_decode_bits"] = {"mean": round(float(np.mean(d)), 3), "max": int(max(d)),
                                        "identical": round(float(np.mean(np.array(d) == 0)), 3)}
    try:
        import imagehash
    except ImportError:
        out["imagehash"] = "not installed (pip install imagehash to compare)"
        return out
    t0 = time.perf_counter()
    theirs = [int(str(imagehash.phash(im)), 16) for im in decoded]
    out["imagehash_phash_ms"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    agree = [ih.hamming(a, b) for a, b in zip(ours, theirs)]
    out["numpy_vs_imagehash_bits"] = {"mean": float(np.mean(agree)), "max": int(max(agree)),
                                      "identical": float(np.mean(np.array(agree) == 0))}
    t0 = time.perf_counter()
    dtheirs = [int(str(imagehash.dhash(im)), 16) for im in decoded]
    out["imagehash_dhash_ms"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    t0 = time.perf_counter()
    dours = [ih.dhash(im) for im in decoded]
    out["numpy_dhash_ms"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    out["dhash_identical"] = float(np.mean([ih.hamming(a, b) == 0 for a, b in zip(dours, dtheirs)]))
    return out


# --- 3. banded join scale --------------------------------------------------------------------------

def _spark(work: Path):
    from spark_jobs.config import load_config
    from spark_jobs.session import get_spark

    cfg = load_config("local", overrides=[
        "spark.master=local[2]", "spark.conf.spark.driver.memory=6g",
        "spark.conf.spark.ui.enabled=true", "spark.conf.spark.ui.port=4747",
        "spark.conf.spark.ui.showConsoleProgress=false",
        "spark.conf.spark.sql.shuffle.partitions=32",
        f"spark.conf.spark.local.dir={work / 'spark-local'}"])
    return get_spark(cfg, "bench-image-dedup")


def _shuffle_bytes(spark) -> int:
    """Shuffle bytes written by every stage so far (Spark's REST API, loopback)."""
    import urllib.request

    sc = spark.sparkContext
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages"
    with urllib.request.urlopen(url, timeout=30) as resp:
        stages = json.load(resp)
    return sum(int(s.get("shuffleWriteBytes", 0)) for s in stages)


def synthetic_hashes(spark, rows: int, copy_fraction: float = 0.1):
    """`rows` hashes: uniform random 64-bit values, and `copy_fraction` of them near copies of
    another row (1-3 bits flipped), so groups exist to be found."""
    from pyspark.sql import functions as F

    ids = spark.range(rows)
    n_copy = int(rows * copy_fraction)
    is_copy = F.col("id") < F.lit(n_copy)
    base_id = F.when(is_copy, F.col("id") + F.lit(n_copy)).otherwise(F.col("id"))
    h = F.xxhash64(base_id)
    flips = F.expr("shiftleft(1L, CAST(id % 64 AS INT)) ^ "
                   "IF(id % 3 > 0, shiftleft(1L, CAST((id * 7 + 3) % 64 AS INT)), 0L)")
    return ids.select(F.col("id").alias("node"), F.when(is_copy, h.bitwiseXOR(flips)).otherwise(h).alias("phash"))


def banded_scale(work: Path, sizes: list[int], bands: int = 4, distance: int = 6) -> list[dict]:
    from pyspark.sql import functions as F

    from spark_jobs.columns import banded_pairs, connected_components
    from udfs.image_dedup.layers import band_layout

    spark = _spark(work)
    out = []
    for rows in sizes:
        path = work / f"hashes_{rows}"
        synthetic_hashes(spark, rows).write.mode("overwrite").parquet(str(path))
        nodes = spark.read.parquet(str(path))
        # the pairs sharing a band value (what a join on (band, value) would materialise), for the
        # growth figure; counted before the measured part, its shuffle is not in the figure
        t0 = time.perf_counter()
        banded = nodes.select("node", F.explode(F.array(*[
            F.struct(F.lit(i).alias("band"), F.shiftrightunsigned("phash", s).bitwiseAND(
                F.lit((1 << w) - 1)).alias("value"))
            for i, (s, w) in enumerate(band_layout(bands))])).alias("bv")).select("node", "bv.*")
        buckets = banded.groupBy("band", "value").count()
        candidates = buckets.select(F.sum(F.col("count") * (F.col("count") - 1) / 2)).collect()[0][0]
        t_cand = time.perf_counter() - t0
        before = _shuffle_bytes(spark)
        t0 = time.perf_counter()
        pairs = banded_pairs(nodes, distance, bands).persist()
        n_pairs = pairs.count()
        t_pairs = time.perf_counter() - t0
        mid = _shuffle_bytes(spark)
        t0 = time.perf_counter()
        comps, rounds, converged = connected_components(pairs, 40)
        n_nodes = comps.count()
        n_comps = comps.select("comp").distinct().count()
        t_comp = time.perf_counter() - t0
        pairs.unpersist()
        after = _shuffle_bytes(spark)
        fig = {"rows": rows, "bands": bands, "distance": distance, "bucket_pairs": int(candidates or 0),
               "verified_pairs": n_pairs, "nodes_in_groups": n_nodes, "components": n_comps, "rounds": rounds,
               "converged": converged, "bucket_count_seconds": round(t_cand, 1),
               "pairs_seconds": round(t_pairs, 1), "components_seconds": round(t_comp, 1),
               "seconds": round(t_pairs + t_comp, 1), "pairs_shuffle_bytes": mid - before,
               "components_shuffle_bytes": after - mid, "shuffle_bytes": after - before}
        print(json.dumps(fig), flush=True)
        out.append(fig)
    return out


def growth(figs: list[dict]) -> dict:
    """Last size over first: rows, seconds and shuffle ratios (linear: the rows' ratio)."""
    if len(figs) < 2:
        return {}
    a, b = figs[0], figs[-1]
    ratio = {"rows": round(b["rows"] / a["rows"], 2)}
    for k in ("seconds", "pairs_seconds", "components_seconds", "shuffle_bytes", "pairs_shuffle_bytes",
              "verified_pairs", "bucket_pairs"):
        ratio[k] = round(b[k] / a[k], 2) if a[k] else None
    return ratio


# --- 4. SemDeDup at scale --------------------------------------------------------------------------

def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def semdedup_scale(rows: int, dim: int = 512, clusters: int = 1000, eps: float = 0.05) -> dict:
    """k-means on a sample + per-cluster greedy SemDeDup, in one process, as the filter stage does
    per cluster group (here without Spark, to measure the algorithm's own time and memory)."""
    import faiss

    from udfs.image_dedup import layers as dd

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(clusters * 2, dim)).astype(np.float32)
    emb = np.empty((rows, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, rows, step):
        k = min(step, rows - s)
        emb[s:s + k] = centres[rng.integers(0, len(centres), k)] + 0.6 * rng.normal(size=(k, dim)).astype(np.float32)
    n_dup = rows // 10    # 10% near copies of other rows
    emb[:n_dup] = emb[n_dup:2 * n_dup] + 0.01 * rng.normal(size=(n_dup, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rss_data = _rss_mb()
    t0 = time.perf_counter()
    km = faiss.Kmeans(dim, clusters, niter=10, seed=0, spherical=True, max_points_per_centroid=256)
    km.train(emb)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, assign = km.index.search(emb, 1)
    assign = assign[:, 0]
    t_assign = time.perf_counter() - t0
    t0 = time.perf_counter()
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(clusters + 1))
    dropped = 0
    largest = 0
    for c in range(clusters):
        idx = order[bounds[c]:bounds[c + 1]]
        largest = max(largest, len(idx))
        if len(idx) < 2:
            continue
        kept_by, _, _ = dd.semdedup_cluster(emb[idx], km.centroids[c], eps)
        dropped += int((kept_by >= 0).sum())
    t_dedup = time.perf_counter() - t0
    found = dropped / n_dup
    return {"rows": rows, "dim": dim, "clusters": clusters, "eps": eps, "train_seconds": round(t_train, 1),
            "assign_seconds": round(t_assign, 1), "dedup_seconds": round(t_dedup, 1),
            "seconds": round(t_train + t_assign + t_dedup, 1), "dropped": dropped, "planted_copies": n_dup,
            "dropped_over_planted": round(found, 4), "largest_cluster": largest,
            "rss_after_data_mb": round(rss_data), "peak_rss_mb": round(_rss_mb()),
            "data_mb": round(emb.nbytes / 2**20)}


class TreeRss:
    """Peak resident memory of this process and its descendants (the JVM, Python workers), summed,
    sampled from /proc every `every` seconds on a thread: what local Spark holds at once."""

    def __init__(self, every: float = 0.5):
        import os
        import threading

        self.root, self.every, self.peak_mb = os.getpid(), every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_mb(self) -> float:
        import os

        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/statm") as fh:
                    rss[int(d)] = int(fh.read().split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
        total, todo = 0, [self.root]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo.extend(children.get(pid, []))
        return total * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak_mb = max(self.peak_mb, self._tree_mb())

    def __enter__(self):
        self.peak_mb = self._tree_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_clustered_embeddings(path: Path, rows: int, dim: int = 512, clusters: int = 1000,
                               step: int = 100_000) -> int:
    """Parquet files of `rows` filter-stage rows (key, uid, bucket, status, float16 image_embedding):
    vectors around 2 x `clusters` random centres, the first 10% near copies (cosine ~0.999) of
    rows 10-20%. Written in chunks, so the driver never holds all vectors. Returns the copies."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from udfs.clip import embeddings

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(clusters * 2, dim)).astype(np.float32)
    n_dup = rows // 10

    def write(first: int, emb: np.ndarray) -> None:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        ids = [f"{i:09d}" for i in range(first, first + len(emb))]
        pq.write_table(pa.table({"key": ids, "uid": [f"u{i}" for i in ids], "bucket": ["en"] * len(ids),
                                 "status": ["success"] * len(ids),
                                 "image_embedding": pa.array(embeddings.encode_rows(emb), pa.binary())}),
                       path / f"part-{first:09d}.parquet")

    for s in range(n_dup, rows, step):
        k = min(step, rows - s)
        emb = centres[rng.integers(0, len(centres), k)] + 0.6 * rng.normal(size=(k, dim)).astype(np.float32)
        write(s, emb)
        src = emb[:max(0, min(k, 2 * n_dup - s))]   # rows n_dup..2 n_dup-1 have a copy at id - n_dup
        if len(src):
            write(s - n_dup, src + 0.01 * rng.normal(size=src.shape).astype(np.float32))
    return n_dup


def semdedup_spark(work: Path, rows: int, clusters: int = 1000, eps: float = 0.05) -> dict:
    """The filter stage's SemDeDup (spark_jobs.columns.semantic_duplicates: driver k-means on a
    sample, mapInPandas assignment, groupBy(scope, cluster).applyInPandas) on local[2], scope
    global: seconds per step and the peak RSS of driver + JVM + Python workers together."""
    from spark_jobs.columns import semantic_duplicates

    path = work / f"semdedup_{rows}"
    t0 = time.perf_counter()
    n_dup = write_clustered_embeddings(path, rows, clusters=clusters)
    gen_s = time.perf_counter() - t0
    spark = _spark(work)
    settings = {"semdedup": {"enabled": True, "eps": eps, "clusters": clusters, "scope": "global",
                             "train_rows": 256000, "seed": 0}, "storage_options": None}
    out_dir = work / f"semdedup_out_{rows}"
    with TreeRss() as mem:
        t0 = time.perf_counter()
        df = spark.read.parquet(str(path))
        drops, info = semantic_duplicates(spark, df, settings, str(out_dir))
        t_plan = time.perf_counter() - t0   # count + sample + k-means train on the driver
        t0 = time.perf_counter()
        dropped = drops.select("key").collect()
        t_dedup = time.perf_counter() - t0  # assign + shuffle + per-cluster SemDeDup
    # greedy from the centroid outwards: either row of a planted pair may be the one dropped
    planted = sum(1 for r in dropped if int(r["key"]) < 2 * n_dup)
    return {"rows": rows, "dim": 512, "clusters": info["clusters"], "eps": eps, "spark": "local[2], driver 6g",
            "generate_seconds": round(gen_s, 1), "count_sample_train_seconds": round(t_plan, 1),
            "assign_shuffle_dedup_seconds": round(t_dedup, 1), "seconds": round(t_plan + t_dedup, 1),
            "dropped": len(dropped), "planted_pairs": n_dup, "dropped_from_planted_pairs": planted,
            "peak_rss_tree_mb": round(mem.peak_mb), "shuffle_bytes": _shuffle_bytes(spark)}


# --- bench/__main__ entry --------------------------------------------------------------------------

def run(work: Path, quick: bool) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    q = near_quality(200 if quick else 1000, 1000 if quick else 5000)
    (work / "near.json").write_text(json.dumps(q, indent=2))
    figs = []
    for d in (4, 6, 8):
        r = q["phash_and_exact"][d]
        easy = min(r["recall_by_transform"][t] for t in ("resize50", "jpeg30", "bright10"))
        figs.append({"name": f"pHash<= {d} + exact: recall resize/jpeg/brightness (min)", "value": easy,
                     "unit": "", "peer": "goal", "peer_value": 0.95, "ratio": round(easy / 0.95, 3),
                     "goal": ">= 1", "note": f"precision {r['precision']}, crop {r['recall_by_transform']['crop5']}, "
                                            f"overlay {r['recall_by_transform']['overlay']}"})
    return figs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_image_dedup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="near,hash", help="near, hash, scale, semdedup, semdedup-spark (comma-separated)")
    p.add_argument("--base", type=int, default=1000)
    p.add_argument("--distinct", type=int, default=5000)
    p.add_argument("--sizes", default="2000000,10000000")
    p.add_argument("--bands", type=int, default=4)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--work", default=str(Path(__file__).resolve().parent / "work" / "image_dedup"))
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    parts = args.part.split(",")
    if "hash" in parts:
        result["hash"] = hash_speed()
        print(json.dumps(result["hash"], indent=1), flush=True)
    if "near" in parts:
        result["near"] = near_quality(args.base, args.distinct)
        print(json.dumps(result["near"], indent=1), flush=True)
    if "scale" in parts:
        result["scale"] = banded_scale(work, [int(s) for s in args.sizes.split(",")], args.bands)
        result["scale_growth"] = growth(result["scale"])
        print(json.dumps(result["scale_growth"]), flush=True)
    if "semdedup-spark" in parts:
        result["semdedup_spark"] = semdedup_spark(work, args.rows, clusters=args.clusters)
        print(json.dumps(result["semdedup_spark"]), flush=True)
    if "semdedup" in parts:
        result["semdedup"] = semdedup_scale(args.rows, clusters=args.clusters)
        print(json.dumps(result["semdedup"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
