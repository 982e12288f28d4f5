"""build-index on generated embeddings: layout, id order, recall, memory-mapping, distributed mode."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from spark_jobs import knn_index
from spark_jobs.datasets import InputError
from tests.gen.embeddings_layout import write_parts, write_random_subset
from udfs.index import build, layout, search, tuning

N, DIM = 1500, 32


def _cfg(cfg, *overrides):
    return cfg.with_overrides(["index.recall_sample=200", "index.nb_cores=2", *overrides])


def _build(cfg, dataset, output, *overrides, spark=None):
    args = argparse.Namespace(input=str(dataset), output=str(output), subset=None)
    return knn_index.run(spark, _cfg(cfg, *overrides), args)


@pytest.fixture(scope="module")
def built(tmp_path_factory, cfg):
    """One subset of 1500 vectors in 12 parts (so img_emb_10 sorts before img_emb_2)."""
    tmp = tmp_path_factory.mktemp("knn")
    _, image, text = write_random_subset(tmp / "dataset", "laion2B-en", n=N, dim=DIM, parts=12)
    stats = _build(cfg, tmp / "dataset", tmp / "indices")
    return tmp, image, text, stats


@pytest.mark.slow
def test_build_writes_contract_layout_and_stats(built):
    tmp, _, _, stats = built
    folder = tmp / "indices" / "laion2B-en"
    for name in ("image.index", "text.index", "index_infos.json", "ids.parquet"):
        assert (folder / name).exists(), name
    infos = json.loads((folder / "index_infos.json").read_text())
    assert infos["status"] == "ok" and infos["nb_vectors"] == N
    for kind in ("image", "text"):
        assert infos["indices"][kind]["nb vectors"] == N
        assert infos["indices"][kind]["dim"] == DIM
    ids = pq.read_table(folder / "ids.parquet")
    assert ids.num_rows == N
    assert set(ids.column_names) >= {"index_id", "SAMPLE_ID", "URL", "TEXT", "similarity",
                                     "LANGUAGE", "key", "tar_path"}
    written = json.loads((tmp / "indices" / "_stats" / "stats.json").read_text())
    assert written["stage"] == "build-index"
    assert written["subsets"]["laion2B-en"]["ids_rows"] == N


@pytest.mark.slow
def test_recall_at_default_settings_meets_goal(built):
    tmp, *_ = built
    infos = json.loads((tmp / "indices" / "laion2B-en" / "index_infos.json").read_text())
    for kind in ("image", "text"):
        assert infos["indices"][kind]["recall_queries"] == 200
        assert infos["indices"][kind]["recall@10"] >= 0.95, infos["indices"][kind]


@pytest.mark.slow
def test_ids_follow_the_order_autofaiss_reads_the_parts(built):
    """Row i of the generated data has URL .../img/{i}.jpg; searching with its own vector must
    find it, which fails if ids were assigned in numeric instead of path order."""
    tmp, image, _, _ = built
    index = search.open_indices(str(tmp / "indices"))["laion2B-en"]
    for i in (0, 5, 130, 700, 1499):
        top = index.search(image[i], "image", 1)[0]
        assert top["URL"] == f"http://127.0.0.1/img/{i}.jpg"
        assert top["score"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_search_agrees_with_exact_flat_search(built):
    tmp, image, text, _ = built
    index = search.open_indices(str(tmp / "indices" / "laion2B-en"))["laion2B-en"]
    rng = np.random.default_rng(5)
    queries = text[rng.choice(N, 25, replace=False)]  # text vectors -> image index, as a user would
    _, exact = tuning.exact_search([image], queries, 10)  # generated row numbers
    # Index ids follow the parts' path order; compare through the URL, which names the row.
    got = np.array([[int(r["URL"].rsplit("/", 1)[1].split(".")[0]) for r in index.search(q, "image", 10)]
                    for q in queries])
    assert tuning.recall_at_k(got, exact, 10) >= 0.95
    assert (got[:, 0] == exact[:, 0]).mean() >= 0.95


def test_exact_search_over_parts_equals_one_flat_search():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    whole_d, whole_i = tuning.exact_search([x], q, 5)
    parts_d, parts_i = tuning.exact_search([x[:100], x[100:101], x[101:]], q, 5)
    np.testing.assert_array_equal(whole_i, parts_i)
    np.testing.assert_allclose(whole_d, parts_d, rtol=1e-5)
    brute = np.argsort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(whole_i, brute)


def test_recall_at_k_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[1, 2, 9, 10], [8, 7, 6, 5]])
    assert tuning.recall_at_k(approx, exact, 4) == pytest.approx((0.5 + 1.0) / 2)
    assert tuning.recall_at_k(np.array([[-1, -1, -1, -1]]), exact[:1], 4) == 0.0


def test_recall_counts_a_result_that_ties_the_kth_exact_score():
    """Scores given by hand: query 0's exact top-2 lists ids 1, 2 at score 0.9; the index answers
    3 (another copy, also 0.9) and 4 (0.5). Only 3 ties the 2nd exact score, so recall is 1/2; a
    result below it, a missing id (-1) and a NaN (not looked up) never count."""
    exact_ids = np.array([[1, 2], [5, 6]])
    kth = np.array([0.9, 0.7])
    approx = np.array([[3, 4], [7, -1]])
    scores = np.array([[0.9, 0.5], [np.nan, 0.8]])
    assert tuning.recall_at_k(approx, exact_ids, 2) == 0.0
    assert tuning.recall_at_k(approx, exact_ids, 2, scores, kth) == pytest.approx((0.5 + 0.0) / 2)
    # for l2 a tie is a distance equal to the k-th smallest one
    assert tuning.recall_at_k(np.array([[3, 4]]), exact_ids[:1], 2, np.array([[0.2, 0.3]]),
                           np.array([0.2]), metric="l2") == pytest.approx(0.5)


def test_only_queries_whose_exact_list_ends_in_a_tie_have_their_results_looked_up():
    """k=2 from a 3-neighbour exact search: query 0's 3rd score (0.8) ties its 2nd, query 1's (0.5)
    does not, so query 1's miss (id 9) is a miss without any lookup, and query 0's result 7 is
    looked up (its vector scores 0.8 against the query: a tie)."""
    scores = np.array([[0.9, 0.8, 0.8], [0.9, 0.8, 0.5]], np.float32)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    exact = tuning.ExactNeighbours.from_search(scores, ids, 2)
    assert exact.tied.tolist() == [True, False] and exact.kth.tolist() == pytest.approx([0.8, 0.8])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    looked_up = []

    def vectors(wanted):
        looked_up.extend(wanted.tolist())
        return np.array([[0.8, 0.6]] * len(wanted), np.float32)

    recall, ties = tuning.graded_recall(np.array([[1, 7], [4, 9]]), queries, exact, 2, vectors)
    assert looked_up == [7] and ties == 1
    assert recall == pytest.approx((1.0 + 0.5) / 2)


def test_repeated_vectors_are_graded_by_distance_and_keep_recall_first(tmp_path, cfg):
    """Text vectors that are 40 distinct vectors repeated 50 times (as the demo's repeated captions
    are): every copy of a query's vector is an exact nearest neighbour, so an index that returns 10
    copies is right whichever 10 the flat search listed. recall_first must keep its index."""
    rng = np.random.default_rng(3)
    distinct = rng.standard_normal((40, 16)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    group = rng.permutation(np.repeat(np.arange(40), 50))
    text = distinct[group]
    image = rng.standard_normal((2000, 16)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    write_parts(tmp_path / "dataset" / "embeddings" / "laion2B-en", image, text, 2)
    _build(cfg, tmp_path / "dataset", tmp_path / "out")
    infos = json.loads((tmp_path / "out" / "laion2B-en" / "index_infos.json").read_text())["indices"]
    assert "recall first" in infos["text"]["chosen_by"], infos["text"]
    assert infos["text"]["recall@10"] >= 0.95 and infos["text"]["recall_ties@10"] > 0
    assert infos["image"]["recall_ties@10"] == 0   # distinct vectors: nothing ties
    # independently of the recall code: what the index serves are copies of the query's vector
    index = search.open_indices(str(tmp_path / "out"))["laion2B-en"]
    for row in (0, 777, 1999):
        served = index.search(text[row], "text", 10)
        rows = [int(r["URL"].rsplit("/", 1)[1].split(".")[0]) for r in served]
        assert len(rows) == 10 and all(group[r] == group[row] for r in rows)


def test_ids_table_is_made_contiguous_for_fast_lookups():
    """Served ids: one chunk per column and 64-bit string offsets, same rows as read."""
    import pyarrow as pa

    chunked = pa.concat_tables([pa.table({"index_id": pa.array([i], pa.int64()), "URL": [f"u{i}"]})
                                for i in range(5)])
    table = search.contiguous(chunked)
    assert all(table.column(name).num_chunks == 1 for name in table.column_names)
    assert table.schema.field("URL").type == pa.large_string()
    assert table.take(pa.array([3, 0])).to_pylist() == [{"index_id": 3, "URL": "u3"},
                                                        {"index_id": 0, "URL": "u0"}]


def test_misaligned_parts_are_an_input_error(tmp_path, cfg):
    root, *_ = write_random_subset(tmp_path / "dataset", n=60, dim=8, parts=2)
    np.save(root / "text_emb" / "text_emb_1.npy", np.zeros((3, 8), np.float16))
    with pytest.raises(layout.EmbeddingLayoutError, match="not row-aligned"):
        layout.list_parts(str(root))
    (root / "metadata" / "metadata_0.parquet").unlink()
    with pytest.raises(InputError, match="metadata_0.parquet is missing"):
        _build(cfg, tmp_path / "dataset", tmp_path / "indices")


def test_budget_autofaiss_would_reject_is_a_config_error(tmp_path, cfg):
    from spark_jobs.config import ConfigError

    with pytest.raises(ConfigError, match="current_memory_available"):
        _build(cfg, tmp_path, tmp_path / "i", "index.current_memory_available=2G")


def test_missing_input_and_unknown_subset_are_input_errors(tmp_path, cfg):
    with pytest.raises(InputError, match="no embeddings folder"):
        _build(cfg, tmp_path / "nothing", tmp_path / "indices")
    write_random_subset(tmp_path / "dataset", n=30, dim=8, parts=1)
    args = argparse.Namespace(input=str(tmp_path / "dataset"), output=str(tmp_path / "i"),
                              subset=["laion2B-xx"])
    with pytest.raises(InputError, match="laion2B-xx"):
        knn_index.run(None, _cfg(cfg), args)


def test_small_subset_builds_and_empty_subset_is_recorded(tmp_path, cfg):
    write_random_subset(tmp_path / "dataset", "laion2B-multi", n=200, dim=8, parts=2)
    empty = tmp_path / "dataset" / "embeddings" / "laion1B-nolang"
    for sub in ("img_emb", "text_emb", "metadata"):
        (empty / sub).mkdir(parents=True)
    stats = _build(cfg, tmp_path / "dataset", tmp_path / "indices")
    assert stats["subsets"]["laion1B-nolang"]["status"] == "empty"
    assert stats["subsets"]["laion2B-multi"]["image"]["recall@10"] == 1.0  # flat for tiny inputs
    indices = search.open_indices(str(tmp_path / "indices"))
    assert indices["laion1B-nolang"].search(np.ones(8), "image", 5) == []
    with pytest.raises(layout.QueryError, match="dimension"):
        indices["laion2B-multi"].search(np.ones(9), "image", 5)
    with pytest.raises(layout.QueryError, match="zeros"):
        indices["laion2B-multi"].search(np.zeros(8), "image", 5)


@pytest.mark.slow
def test_memory_mapped_index_is_ivf_and_searchable(tmp_path, cfg):
    _, image, _ = write_random_subset(tmp_path / "dataset", n=1200, dim=16, parts=2)
    _build(cfg, tmp_path / "dataset", tmp_path / "indices", "index.memory_mapped=true")
    infos = json.loads((tmp_path / "indices" / "laion2B-en" / "index_infos.json").read_text())
    assert infos["indices"]["image"]["index_key"].startswith("IVF")
    index = search.open_indices(str(tmp_path / "indices"), memory_mapped=True)["laion2B-en"]
    assert index.search(image[42], "image", 3)[0]["URL"].endswith("/42.jpg")


@pytest.mark.slow
def test_distributed_build_on_local_spark(tmp_path, cfg, spark):
    """autofaiss's pyspark mode on the shared local[2] session gives the same neighbours."""
    _, image, _ = write_random_subset(tmp_path / "dataset", n=1200, dim=16, parts=3)
    stats = _build(cfg, tmp_path / "dataset", tmp_path / "indices", "index.distributed=true",
                   spark=spark)
    assert stats["subsets"]["laion2B-en"]["image"]["recall@10"] >= 0.95
    index = search.open_indices(str(tmp_path / "indices"))["laion2B-en"]
    assert index.search(image[1100], "image", 1)[0]["URL"].endswith("/1100.jpg")
    assert not (tmp_path / "indices" / "_tmp_distributed" / "laion2B-en" / "image").exists()


@pytest.mark.slow
def test_low_recall_search_parameters_are_widened_to_the_goal(tmp_path, cfg):
    """An IVF index searched with nprobe=1 misses neighbours in other lists; the build widens
    nprobe until recall@10 reaches index.min_recall, and serving uses the widened value."""
    _, image, _ = write_random_subset(tmp_path / "dataset", n=2000, dim=16, parts=2)
    base = ["index.index_key=IVF32,Flat", "index.index_param=nprobe=1"]
    _build(cfg, tmp_path / "dataset", tmp_path / "off", *base, "index.min_recall=null")
    _build(cfg, tmp_path / "dataset", tmp_path / "on", *base)
    off = json.loads((tmp_path / "off" / "laion2B-en" / "index_infos.json").read_text())["indices"]["image"]
    on = json.loads((tmp_path / "on" / "laion2B-en" / "index_infos.json").read_text())["indices"]["image"]
    assert off["index_param"] == "nprobe=1" and off["recall@10"] < 0.95
    assert on["autofaiss_index_param"] == "nprobe=1"
    assert on["autofaiss_recall@10"] == off["recall@10"]
    assert on["recall@10"] >= 0.95 and on["index_param"] != "nprobe=1"
    index = search.open_indices(str(tmp_path / "on"))["laion2B-en"]
    import faiss

    assert faiss.extract_index_ivf(index.indices["image"]).nprobe == int(on["index_param"].split("=")[1])

    # A query-time cap stops the widening: the parameters within the cap are kept and it says why.
    _build(cfg, tmp_path / "dataset", tmp_path / "capped", *base, "index.recall_tuning_max_query_ms=0.000001")
    capped = json.loads((tmp_path / "capped" / "laion2B-en" / "index_infos.json").read_text())["indices"]["image"]
    assert capped["index_param"] == "nprobe=1" and "would take" in capped["recall_tuning_stopped"]
    assert capped["recall@10"] == off["recall@10"]


@pytest.mark.slow
def test_recall_fallback_reranks_when_autofaiss_index_misses_the_goal(tmp_path, cfg, caplog):
    """Structureless vectors and an IVF index at nprobe=1 with one widening step: recall stays far
    below the goal, so build-index swaps in the exhaustive fast-scan PQ index with exact
    re-ranking; serving loads it with its tuned k_factor_rf and agrees with exact search."""
    n, dim = 4000, 32
    _, image, _ = write_random_subset(tmp_path / "dataset", n=n, dim=dim, parts=2, clusters=n)
    base = ["index.index_key=IVF64,Flat", "index.index_param=nprobe=1", "index.recall_tuning_steps=1"]
    _build(cfg, tmp_path / "dataset", tmp_path / "on", *base)
    on = json.loads((tmp_path / "on" / "laion2B-en" / "index_infos.json").read_text())["indices"]["image"]
    assert on["index_key"] == "PQ16x4fs,RFlat" and on["index_param"].startswith("k_factor_rf=")
    assert on["recall@10"] >= 0.95 and on["nb vectors"] == n
    assert on["autofaiss"]["index_key"] == "IVF64,Flat" and on["autofaiss"]["recall@10"] < 0.8
    assert "recall fallback" in on["chosen_by"]
    assert on["single_query_ms"] <= 50 and on["avg_search_speed_ms"] == on["single_query_ms"]
    assert on["size in bytes"] == (tmp_path / "on" / "laion2B-en" / "image.index").stat().st_size

    index = search.open_indices(str(tmp_path / "on"))["laion2B-en"]
    queries = image[::97]
    exact = np.argsort(-(queries @ image.T), axis=1)[:, :10]
    got = np.array([[int(r["URL"].rsplit("/", 1)[1].split(".")[0]) for r in index.search(q, "image", 10)]
                    for q in queries])
    assert tuning.recall_at_k(got, exact, 10) >= 0.95
    assert all(got[:, 0] == np.arange(0, n, 97))
    assert index.indices["image"].k_factor == int(on["index_param"].split("=")[1])
    with caplog.at_level(logging.WARNING, logger="udfs.index.search"):
        search.open_indices(str(tmp_path / "on"), memory_mapped=True)
    assert "not an IVF index" in caplog.text   # serve.memory_mapped cannot map it, and says so

    # Switched off, or over the memory budget: autofaiss's index stays and the infos say why.
    _build(cfg, tmp_path / "dataset", tmp_path / "off", *base, "index.recall_fallback=false")
    _build(cfg, tmp_path / "dataset", tmp_path / "small", *base, "index.max_index_memory_usage=100K")
    for name, reason in (("off", "index.recall_fallback=false"), ("small", "max_index_memory_usage")):
        kept = json.loads((tmp_path / name / "laion2B-en" / "index_infos.json").read_text())["indices"]["image"]
        assert kept["index_key"] == "IVF64,Flat" and kept["recall@10"] == on["autofaiss"]["recall@10"]
        assert kept["recall_fallback"]["status"] == "skipped" and reason in kept["recall_fallback"]["reason"]


def test_build_index_command_line(tmp_path, capsys):
    """`spark-submit spark_jobs/knn_index.py ...` / `clipcrawl build-index` argument handling."""
    write_random_subset(tmp_path / "dataset", n=120, dim=8, parts=2)
    rc = knn_index.main(["--input", str(tmp_path / "dataset"), "--output", str(tmp_path / "indices"),
                         "--set", "index.recall_sample=20", "--log-level", "WARNING"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["subsets"]["laion2B-en"]["ids_rows"] == 120
    assert knn_index.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "no embeddings folder" in capsys.readouterr().err


def test_ids_parquet_matches_its_declared_schema(tmp_path, spark):
    from spark_jobs import datasets, schemas

    write_random_subset(tmp_path / "dataset", n=50, dim=8, parts=1)
    infos = build.build_subset(str(tmp_path / "dataset" / "embeddings" / "laion2B-en"),
                             str(tmp_path / "indices"), tuning.BuildParams(recall_sample=10))
    assert infos["status"] == "ok"
    df = datasets.read_dataset(spark, str(tmp_path / "indices" / "ids.parquet"), schemas.INDEX_IDS)
    assert [f.name for f in df.schema.fields] == schemas.INDEX_IDS.schema.fieldNames()
    assert df.count() == 50


def test_recall_first_keeps_the_reranking_index_without_running_autofaiss(tmp_path, cfg, monkeypatch):
    """Default strategy: the fast-scan re-ranking index is built first and, reaching the goal
    within the cap, kept; autofaiss is never called. autofaiss_first still runs autofaiss."""
    _, image, _ = write_random_subset(tmp_path / "dataset", "laion2B-en", n=3000, dim=16, parts=3)
    calls = []
    real = build.build_kind_index
    monkeypatch.setattr(build, "build_kind_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    stats = _build(cfg, tmp_path / "dataset", tmp_path / "first")
    infos = json.loads((tmp_path / "first" / "laion2B-en" / "index_infos.json").read_text())["indices"]
    assert calls == []
    for kind in ("image", "text"):
        assert infos[kind]["index_key"] == "PQ8x4fs,RFlat" and "recall first" in infos[kind]["chosen_by"]
        assert infos[kind]["recall@10"] >= 0.95 and infos[kind]["nb vectors"] == 3000
    assert stats["subsets"]["laion2B-en"]["image"]["recall@10"] >= 0.95
    # the served index agrees with exact search on a row's own vector
    index = search.open_indices(str(tmp_path / "first"))["laion2B-en"]
    assert index.size == 3000
    for i in (0, 1234, 2999):
        assert index.search(image[i], "image", 1)[0]["URL"] == f"http://127.0.0.1/img/{i}.jpg"
    _build(cfg, tmp_path / "dataset", tmp_path / "af", "index.strategy=autofaiss_first")
    assert len(calls) == 2   # image and text
    af = json.loads((tmp_path / "af" / "laion2B-en" / "index_infos.json").read_text())["indices"]
    assert "recall first" not in af["image"].get("chosen_by", "") and "recall_first" not in af["image"]


def test_recall_first_yields_to_autofaiss_when_it_misses_the_cap(tmp_path, cfg):
    """A cap no index can meet: the attempt is recorded, autofaiss builds, and the fallback is not
    built a second time for the same verdict."""
    write_random_subset(tmp_path / "dataset", "laion2B-en", n=2000, dim=16, parts=2)
    _build(cfg, tmp_path / "dataset", tmp_path / "out", "index.recall_tuning_max_query_ms=0.000001")
    infos = json.loads((tmp_path / "out" / "laion2B-en" / "index_infos.json").read_text())["indices"]["image"]
    assert infos["recall_first"]["status"] == "not kept" and infos["recall_first"]["within_cap"] is False
    assert "recall first" not in infos.get("chosen_by", "")
    assert infos["index_key"] != "PQ8x4fs,RFlat"


def test_refine_index_is_built_in_one_pass_over_the_parts(tmp_path, monkeypatch):
    _, image, _ = write_random_subset(tmp_path / "dataset", "s", n=1200, dim=8, parts=4)
    parts = layout.list_parts(str(tmp_path / "dataset" / "embeddings" / "s"))
    loads = []
    real = layout.load_part
    monkeypatch.setattr(layout, "load_part", lambda p, *a, **k: loads.append(p.number) or real(p, *a, **k))
    index = tuning.build_refine_index(parts, "image", 8, train_size=500)
    assert sorted(loads) == sorted(p.number for p in parts)   # each part read once
    assert index.ntotal == 1200
    layout.apply_index_param(index, "k_factor_rf=64")
    _, ids = index.search(np.ascontiguousarray(image[:5], dtype=np.float32), 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
