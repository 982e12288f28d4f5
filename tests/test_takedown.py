"""`clipcrawl takedown`: the removal list, index removal per faiss type, the download stage's block
store, and the whole thing end to end on a demo-sized chain (wat-extract .. build-index with the
tiny CLIP): two URLs, one sample_id and one sha256 taken out of every parquet, tar, embeddings
layout and index; search and serve no longer return them; a second run is a no-op; a killed run
leaves each file old or new; a rerun of the pipeline does not bring them back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from udfs.download import block_list
from udfs.ids import pair_uid, uid_to_int64
from udfs.takedown import rewrite as td

REPO = Path(__file__).resolve().parent.parent


# --- the list ------------------------------------------------------------------------------------

def test_parse_list_normalises_entries_and_reports_bad_lines():
    text = "\n".join([
        "# a comment", "",
        "HTTP://Example.COM/a/B.jpg#fragment",
        "sample_id:-42",
        "SHA256:" + "AB" * 32,
        "domain:Images.Example.org.",
        "http://example.com/a/B.jpg",          # the first entry again, spelled otherwise
        "sample_id:12x",
        "sha256:abc",
        "ftp://example.com/x.jpg",
        "domain:bad host",
        f"sample_id:{2 ** 63}",
    ])
    entries, bad = block_list.parse_list(text)
    assert [e.text for e in entries] == [
        "http://example.com/a/B.jpg", "sample_id:-42", "sha256:" + "ab" * 32, "domain:images.example.org"]
    assert [b["line"] for b in bad] == [8, 9, 10, 11, 12]
    assert all(b["error"] for b in bad)


def test_matcher_domains_sample_ids_and_sha256():
    entries, _ = block_list.parse_list("domain:example.com\nsample_id:%d\nsha256:%s\n" % (
        uid_to_int64(pair_uid("http://other.net/x.jpg", "a caption")), "cd" * 32))
    m = block_list.Matcher(entries)
    assert m.match(url="https://cdn.images.example.com/p.jpg") == "domain:example.com"
    assert m.match(url="https://EXAMPLE.com/p.jpg") == "domain:example.com"
    assert m.match(url="https://notexample.com/p.jpg") is None
    assert m.match(url="https://example.com.evil.net/p.jpg") is None
    assert m.match(uid=pair_uid("http://other.net/x.jpg", "a caption")).startswith("sample_id:")
    assert m.match(uid=pair_uid("http://other.net/x.jpg", "another caption")) is None
    assert m.match(sha256="cd" * 32) == "sha256:" + "cd" * 32
    for sid in (0, -1, 2 ** 63 - 1, -2 ** 63, 1234567890123):
        assert block_list.sample_id_of_uid(block_list.uid_of_sample_id(sid)) == sid


# --- faiss removal per index type ----------------------------------------------------------------

@pytest.mark.parametrize("key, method", [
    ("Flat", "remove_ids"),
    ("IVF8,Flat", "remove_ids (ivf, ids renumbered)"),
    ("PCA16,IVF8,SQ8", "remove_ids (ivf, ids renumbered)"),
    ("HNSW16", "rebuild (HNSW16)"),
    ("PQ8x4fs,RFlat", "rebuild (PQ8x4fs,RFlat)"),
])
def test_remove_from_index_renumbers_to_row_order(key, method):
    import faiss

    from tests.gen.embeddings_layout import clustered_vectors

    x = clustered_vectors(600, 16, clusters=8, seed=1)
    index = faiss.index_factory(16, key, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    gone = np.array([0, 5, 17, 300, 599])
    new, used = td.remove_from_index(index, gone, key)
    assert used == method
    assert new.ntotal == 600 - len(gone)
    kept = np.setdiff1d(np.arange(600), gone)
    ivf = faiss.try_extract_index_ivf(new)
    if ivf is not None:
        ivf.nprobe = ivf.nlist
    if "HNSW" in key:
        faiss.ParameterSpace().set_index_parameters(new, "efSearch=128")
    if "RFlat" in key:
        faiss.ParameterSpace().set_index_parameters(new, "k_factor_rf=64")
    _, ids = new.search(x[kept], 1)
    exact = (ids[:, 0] == np.arange(len(kept))).mean()
    assert exact >= (0.99 if "SQ8" not in key else 0.9), exact   # row i of the kept rows is id i
    _, ids = new.search(x[gone], 3)
    assert (ids < new.ntotal).all()


# --- download never fetches what the block store names -------------------------------------------

def test_download_shard_skips_blocked_rows_and_never_writes_blocked_bytes(tmp_path):
    from tests.gen.image_server import ImageServer, encode, noise_image
    from udfs.download.download_worker import download_shard
    from udfs.download.shard_writer import iter_samples

    with ImageServer() as srv:
        bodies = {name: encode(noise_image(200, 160, seed=i)) for i, name in enumerate("abcde")}
        urls = {name: srv.url(srv.add(f"/{name}.jpg", body)) for name, body in bodies.items()}
        rows = [{"key": f"00000000{i}", "url": urls[n], "text": f"caption {n}",
                 "uid": pair_uid(urls[n], f"caption {n}")} for i, n in enumerate("abcde")]
        store = tmp_path / "_takedown" / "blocked"
        store.mkdir(parents=True)
        (store / "r1.txt").write_text("\n".join([
            urls["a"],                                            # by URL
            f"sample_id:{uid_to_int64(rows[1]['uid'])}",          # by pair
            "sha256:" + hashlib.sha256(bodies["c"]).hexdigest(),  # by content
        ]) + "\n")
        (store / "r2.txt").write_text(f"{urls['d'].replace('127.0.0.1', 'LOCALHOST')}\n")  # not d's host
        section = {"thread_count": 2, "image_size": 64, "resize_mode": "border", "output_format": "jpg",
                   "min_image_bytes": 1000, "allowed_cidrs": "127.0.0.0/8", "retries": 0,
                   "block_store": str(store)}
        download_shard(0, rows, section, str(tmp_path / "images"))
        # robots.txt and tdmrep.json are the consent checks' own requests (download.robots_txt/tdmrep)
        requested = {p for p, _ in srv.requests if p not in ("/robots.txt", "/.well-known/tdmrep.json")}
    meta = {r["key"][-1]: r for r in pq.read_table(tmp_path / "images" / "00000.parquet").to_pylist()}
    assert [meta[str(i)]["status"] for i in range(5)] == ["taken_down"] * 3 + ["success"] * 2
    for i in range(3):
        assert meta[str(i)]["text"] is None and meta[str(i)]["bytes"] is None
        assert meta[str(i)]["url"] == rows[i]["url"] and meta[str(i)]["uid"] == rows[i]["uid"]
    assert requested == {"/c.jpg", "/d.jpg", "/e.jpg"}   # a and b never requested; c fetched, then dropped
    assert sorted(s["__key__"] for s in iter_samples(str(tmp_path / "images" / "00000.tar"))) == \
        ["000000003", "000000004"]


# --- end to end on the demo-sized chain ----------------------------------------------------------

N_IMAGES = 48
CHAIN_OVERRIDES = ["download.shard_size=8", "download.thread_count=4", "clip.batch_size=8"]
SUBSETS = ("laion2B-en", "laion2B-multi", "laion1B-nolang")


@pytest.fixture(scope="module")
def server():
    from tests.gen.image_server import ImageServer

    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def chain(spark, server, tmp_path_factory):
    """wat-extract .. build-index once, then a pristine copy for the kill test."""
    from demo.__main__ import demo_config
    from demo.sample import build_sample
    from tests.conftest import run_chain

    base = tmp_path_factory.mktemp("takedown")
    sample = build_sample(server, base / "sample", n_images=N_IMAGES, n_files=2, seed=7)
    root = base / "run"
    cfg = demo_config(root, sample["wat_files"], CHAIN_OVERRIDES)
    run_chain(spark, cfg)
    pristine = base / "pristine"
    shutil.copytree(root, pristine)
    return {"root": root, "pristine": pristine, "cfg": cfg, "base": base}


def _subset_rows(root: Path) -> list[dict]:
    rows = []
    for subset in SUBSETS:
        for f in sorted((root / "dataset" / subset).glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                rows.append(dict(r, subset=subset))
    return rows


def _images_meta(root: Path) -> dict[str, dict]:
    return {r["uid"]: r for f in sorted((root / "images").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.relative_to(root).parts[0] == "_takedown"}


def _images_in_tars(root: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted((root / "images").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    out[m.name[:-4]] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def taken(chain):
    """Pick two URLs, one sample_id and one sha256 of items in the subsets (and in different
    subsets and shards where the sample allows), write the list, run `clipcrawl takedown`."""
    from spark_jobs import cli

    root = chain["root"]
    rows = _subset_rows(root)
    meta = _images_meta(root)
    by_subset: dict[str, list[dict]] = {}
    for r in rows:
        by_subset.setdefault(r["subset"], []).append(r)
    ordered = [r for group in zip(*[by_subset[s] for s in SUBSETS if by_subset.get(s)]) for r in group]
    ordered += [r for r in rows if r not in ordered]
    picks = ordered[:4]
    assert len(picks) == 4, "the demo chain kept fewer than 4 pairs"
    targets = []
    for r, kind in zip(picks, ("url", "url", "sample_id", "sha256")):
        uid = block_list.uid_of_sample_id(r["SAMPLE_ID"])
        targets.append({"kind": kind, "url": r["URL"], "uid": uid, "sample_id": r["SAMPLE_ID"],
                        "sha256": meta[uid]["sha256"], "key": r["key"], "subset": r["subset"],
                        "text": r["TEXT"]})
    lines = [targets[0]["url"], targets[1]["url"].replace("http://", "HTTP://") + "#frag",
             f"sample_id:{targets[2]['sample_id']}", f"sha256:{targets[3]['sha256']}",
             "# lines that are not entries are reported, not fatal", "not an entry"]
    list_file = chain["base"] / "removal.txt"
    list_file.write_text("\n".join(lines) + "\n")
    # every pair with a target's URL goes (a URL entry), only the pair itself for sample_id
    urls_gone = {targets[0]["url"], targets[1]["url"]}
    uids_gone = {t["uid"] for t in targets} | {u for u, m in meta.items() if m["url"] in urls_gone}
    uids_gone |= {u for u, m in meta.items() if m.get("sha256") == targets[3]["sha256"]}
    before = {
        "ntotal": {s: json.loads((root / "indices" / s / "index_infos.json").read_text())["nb_vectors"]
                   for s in SUBSETS if (root / "indices" / s / "ids.parquet").exists()},
        "tar_images": _images_in_tars(root),
        "vectors": _vectors_by_uid(root),
        "hashes": _tree_hashes(root),
        "subset_of_uid": {block_list.uid_of_sample_id(r["SAMPLE_ID"]): r["subset"] for r in rows},
    }
    args = argparse.Namespace(root=str(root), list_uri=str(list_file))
    result = cli._load_stage("spark_jobs.takedown").run(None, chain["cfg"], args)
    record = json.loads(Path(result["record"]).read_text())
    print(f"\ntakedown on the demo chain ({sum(1 for _ in root.rglob('*') if _.is_file())} files): "
          f"{record['seconds']:.2f} s, {record['files_changed']} files rewritten")
    return {"targets": targets, "list": list_file, "result": result, "record": record, "before": before,
            "uids_gone": uids_gone, "keys_gone": {meta[u]["key"] for u in uids_gone},
            "urls_gone": {meta[u]["url"] for u in uids_gone}, "after": _tree_hashes(root)}


def _vectors_by_uid(root: Path) -> dict[str, np.ndarray]:
    from udfs.clip import embeddings

    out = {}
    for subset in SUBSETS:
        layout = root / "dataset" / "embeddings" / subset
        if not (layout / "metadata").exists():
            continue
        img, _, meta = embeddings.read_retrieval(str(layout))
        for vec, sid in zip(img, meta["SAMPLE_ID"]):
            out[block_list.uid_of_sample_id(int(sid))] = vec.astype(np.float32)
    return out


def _row_uid(row: dict) -> str | None:
    if row.get("uid"):
        return row["uid"]
    for col in ("SAMPLE_ID", "hash"):
        if row.get(col) is not None:
            return block_list.uid_of_sample_id(row[col])
    return None


@pytest.mark.slow
def test_record_and_counts(taken):
    record, result = taken["record"], taken["result"]
    assert result["changed"] and result["items_removed"] == len(taken["uids_gone"])
    assert set(record["removed_sample_ids"]) == {block_list.sample_id_of_uid(u) for u in taken["uids_gone"]}
    assert all(n > 0 for n in result["matches_by_entry"].values()), result["matches_by_entry"]
    assert [b["text"] for b in record["bad_lines"]] == ["not an entry"]
    kinds = {f["kind"] for f in record["files"]}
    assert kinds == {"parquet", "tombstone", "tar", "embeddings", "index"}
    removal_list = (Path(record["root"]) / "_takedown" / "removal_list.txt").read_text()
    assert {int(line.split(":")[1]) for line in removal_list.splitlines() if line.startswith("sample_id:")} \
        == set(record["removed_sample_ids"])


def _assert_only_tombstones(root: Path, taken: dict, allowed: tuple[str, ...]) -> int:
    """Every parquet row under root that names a removed item is a content-free tombstone in
    one of the `allowed` datasets; returns how many there are."""
    seen = 0
    for f in sorted(root.rglob("*.parquet")):
        if "_takedown" in f.parts or any(part.startswith(".") for part in f.parts):
            continue
        for row in pq.read_table(f).to_pylist():
            url = row.get("url") or row.get("URL")
            if _row_uid(row) not in taken["uids_gone"] and url not in taken["urls_gone"]:
                continue
            rel = f.relative_to(root)
            assert rel.parts[0] in allowed, rel
            for content in ("text", "TEXT", "page_url", "image_embedding", "text_embedding", "bytes", "sha256"):
                assert row.get(content) is None, (rel, content)
            if "status" in row:
                assert row["status"] == "taken_down", rel
            seen += 1
    return seen


@pytest.mark.slow
def test_no_parquet_holds_them_except_as_tombstones(taken, chain):
    root = chain["root"]
    # only the download metadata and the download stage's inputs keep a row, without content
    seen = _assert_only_tombstones(root, taken, ("images", "wat_pairs", "pairs_dedup"))
    assert seen >= 3 * len(taken["uids_gone"])
    statuses = {r["uid"]: r["status"] for r in _images_meta(root).values()}
    assert {u for u, s in statuses.items() if s == "taken_down"} == taken["uids_gone"]


@pytest.mark.slow
def test_no_tar_holds_them(taken, chain):
    root = chain["root"]
    for tar_path in sorted((root / "images").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key = m.name.split(".", 1)[0]
                assert key not in taken["keys_gone"], (tar_path.name, m.name)
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    assert rec["url"] not in taken["urls_gone"] and rec["uid"] not in taken["uids_gone"]
    before_keys = set(taken["before"]["tar_images"])
    assert before_keys - set(_images_in_tars(root)) == taken["keys_gone"] & before_keys


@pytest.mark.slow
def test_indices_shrank_by_the_removed_count_and_stay_aligned(taken, chain):
    import faiss

    from udfs.clip import embeddings
    from udfs.index import layout as index_layout

    root = chain["root"]
    gone_per_subset: dict[str, int] = {}
    for uid, subset in taken["before"]["subset_of_uid"].items():
        if uid in taken["uids_gone"]:
            gone_per_subset[subset] = gone_per_subset.get(subset, 0) + 1
    assert sum(gone_per_subset.values()) >= 4
    for subset, before in taken["before"]["ntotal"].items():
        folder = root / "indices" / subset
        ids = pq.read_table(folder / "ids.parquet").to_pylist()
        assert [r["index_id"] for r in ids] == list(range(len(ids)))
        assert not {_row_uid(r) for r in ids} & taken["uids_gone"]
        layout = root / "dataset" / "embeddings" / subset
        parts = index_layout.list_parts(str(layout))       # raises unless every part is row-aligned
        meta = [r for p in parts for r in pq.read_table(p.metadata).to_pylist()]
        assert [r["SAMPLE_ID"] for r in meta] == [r["SAMPLE_ID"] for r in ids]
        for kind in ("image", "text"):
            index = faiss.read_index(str(folder / index_layout.INDEX_FILES[kind]))
            assert index.ntotal == before - gone_per_subset.get(subset, 0), (subset, kind)
            vectors = np.concatenate([index_layout.load_part(p, kind) for p in parts])
            if index.ntotal:   # the demo's indices are Flat: row i of the embeddings is vector i
                assert np.allclose(index.reconstruct_n(0, index.ntotal), vectors, atol=1e-3)
        infos = json.loads((folder / "index_infos.json").read_text())
        assert infos["nb_vectors"] == infos["nb_ids"] == len(ids)
    scored = embeddings.check_retrieval_layout(str(root / "scored"))
    assert scored["rows"] == sum(1 for r in _images_meta(root).values() if r["status"] == "success")


def _search_cli(root: Path, subset: str, vector: np.ndarray, tmp: Path) -> list[dict]:
    emb = tmp / f"q-{subset}.npy"
    np.save(emb, vector.astype(np.float32))
    out = subprocess.run([sys.executable, "-m", "spark_jobs.cli", "search", "--config",
                          str(REPO / "conf" / "presets" / "tiny_clip.yaml"), "--index", str(root / "indices"),
                          "--subset", subset, "--embedding", str(emb), "-k", "50", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_search_and_serve_do_not_return_them(taken, chain, cfg, tmp_path):
    from serving.http import make_server
    from serving.service import KnnService
    from udfs.index import search

    root = chain["root"]
    targets = [t for t in taken["targets"] if t["uid"] in taken["before"]["vectors"]]
    for t in targets:   # the removed item's own vector: before, it was its own nearest neighbour
        hits = _search_cli(root, t["subset"], taken["before"]["vectors"][t["uid"]], tmp_path)
        assert not {h["URL"] for h in hits} & taken["urls_gone"]
        assert t["sample_id"] not in {h["SAMPLE_ID"] for h in hits}

    service = KnnService(search.open_indices(str(root / "indices")), cfg.section("serve"), encoder=None)
    srv = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    removed_images = {hashlib.sha256(b).hexdigest() for k, b in taken["before"]["tar_images"].items()
                      if k in taken["keys_gone"]}
    try:
        for t in targets:
            body = json.dumps({"embedding_input": taken["before"]["vectors"][t["uid"]].tolist(),
                               "num_images": 50, "indice_name": t["subset"]}).encode()
            req = urllib.request.Request(base + "/knn-service", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=20) as resp:
                results = json.loads(resp.read())
            assert not {r["url"] for r in results} & taken["urls_gone"]
        served = 0
        for subset, index in service.indices.items():
            for i in range(index.size):
                with urllib.request.urlopen(f"{base}/thumbnail?indice_name={subset}&id={i}", timeout=20) as resp:
                    assert hashlib.sha256(resp.read()).hexdigest() not in removed_images
                    served += 1
        assert served == sum(taken["before"]["ntotal"].values()) - len(
            [u for u in taken["uids_gone"] if u in taken["before"]["subset_of_uid"]])
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.slow
def test_second_takedown_removes_nothing_and_says_so(taken, chain):
    from spark_jobs import cli

    root = chain["root"]
    args = argparse.Namespace(root=str(root), list_uri=str(taken["list"]))
    again = cli._load_stage("spark_jobs.takedown").run(None, chain["cfg"], args)
    assert again["changed"] is False and again["items_removed"] == 0 and again["files_changed"] == 0
    assert again["message"].startswith("nothing to remove")
    assert again["block_store_added"] == []
    assert _tree_hashes(root) == taken["after"]


@pytest.mark.slow
def test_killed_takedown_leaves_old_or_new_files_and_the_next_run_finishes(taken, chain):
    from spark_jobs.faults import InjectedFault, maybe_fail_step

    copy = chain["base"] / "killed"
    shutil.copytree(chain["pristine"], copy)
    swaps = taken["record"]["files_changed"]
    spec = {"stage": "takedown", "partition": swaps // 2, "log": None}
    with pytest.raises(InjectedFault):
        td.takedown(str(copy), str(taken["list"]), tombstone_dirs=["wat_pairs", "pairs_dedup"],
                    run_id=taken["record"]["run_id"], fault=lambda step: maybe_fail_step(spec, "takedown", step))
    now = _tree_hashes(copy)
    old, new = taken["before"]["hashes"], taken["after"]
    staged = {k for k in now if td.TMP_MARK in k}
    assert staged, "the kill should leave staged files behind"
    states = {"old": 0, "new": 0}
    for rel, digest in now.items():
        if rel in staged:
            continue
        assert digest in (old.get(rel), new.get(rel)), f"{rel} is neither the old nor the new file"
        if old.get(rel) != new.get(rel):
            states["old" if digest == old.get(rel) else "new"] += 1
    assert states["old"] > 0 and states["new"] > 0, states    # killed half way through the swaps
    finish = td.takedown(str(copy), str(taken["list"]), tombstone_dirs=["wat_pairs", "pairs_dedup"])
    assert finish["recovered_runs"] == [taken["record"]["run_id"]]
    assert finish["changed"] is False
    assert _tree_hashes(copy) == new
    assert (copy / "_takedown" / f"{taken['record']['run_id']}.json").exists()


@pytest.mark.slow
def test_rerun_of_the_pipeline_does_not_restore_them(taken, chain, server, spark):
    """Redo download (its shards that held the items lose their completion marker, so they are
    fetched again) and every stage after it: the block store keeps the items out."""
    from tests.conftest import run_chain

    root = chain["root"]
    shards = {int(k[:5]) for k in taken["keys_gone"]}
    for shard in shards:
        (root / "images" / f"{shard:05d}_complete.json").unlink()
    seen_before = len(server.requests)
    run_chain(spark, chain["cfg"], force=["download"])
    fetched = {p for p, _ in server.requests[seen_before:]}
    assert fetched, "the shards without a marker should have been downloaded again"
    assert not {u.split(str(server.port), 1)[1] for u in taken["urls_gone"]} & fetched
    assert not {_row_uid(r) for r in _subset_rows(root)} & taken["uids_gone"]
    assert not set(_images_in_tars(root)) & taken["keys_gone"]
    meta = _images_meta(root)
    assert {u for u, m in meta.items() if m["status"] == "taken_down"} == taken["uids_gone"]
    assert all(meta[u]["text"] is None for u in taken["uids_gone"])
    for subset, before in taken["before"]["ntotal"].items():
        infos = json.loads((root / "indices" / subset / "index_infos.json").read_text())
        gone = sum(1 for u, s in taken["before"]["subset_of_uid"].items() if s == subset and u in taken["uids_gone"])
        assert infos["nb_vectors"] == before - gone
        ids = pq.read_table(root / "indices" / subset / "ids.parquet").to_pylist()
        assert not {_row_uid(r) for r in ids} & taken["uids_gone"]
    _assert_only_tombstones(root, taken, ("images", "wat_pairs", "pairs_dedup", "images_dedup", "scored",
                                          "dataset_rejected"))


# --- on s3 (moto on 127.0.0.1) -------------------------------------------------------------------

def _small_root(tmp: Path) -> Path:
    """A published root in miniature: one subset's embeddings (two parts), its Flat indices, a
    subset parquet, one tar shard with its download metadata."""
    import pyarrow as pa
    from PIL import Image

    from tests.gen.embeddings_layout import clustered_vectors, write_parts, write_tar
    from udfs.download.download_worker import metadata_table
    from udfs.index import build, tuning

    n = 40
    root = tmp / "root"
    tar = write_tar(root / "images" / "00000.tar", [Image.new("RGB", (32, 32), (6 * i, 0, 0)) for i in range(n)],
                    [f"caption number {i}" for i in range(n)])
    layout = write_parts(root / "dataset" / "embeddings" / "laion2B-en", clustered_vectors(n, 16, seed=3),
                         clustered_vectors(n, 16, seed=4), 2, tar_path=tar)
    meta = [r for f in sorted((layout / "metadata").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    (root / "dataset" / "laion2B-en").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(meta), root / "dataset" / "laion2B-en" / "part-0.parquet")
    records = [{"key": r["key"], "uid": block_list.uid_of_sample_id(r["SAMPLE_ID"]), "url": r["URL"], "text": r["TEXT"],
                "shard": 0, "status": "success", "bytes": 1000 + i, "sha256": f"{i:064x}"} for i, r in enumerate(meta)]
    pq.write_table(metadata_table(records), root / "images" / "00000.parquet")
    build.build_subset(str(layout), str(root / "indices" / "laion2B-en"), tuning.BuildParams(recall_sample=10, nb_cores=1))
    return root


def test_takedown_on_s3(tmp_path, moto_s3):
    import faiss

    from udfs import fsio

    local = _small_root(tmp_path)
    bucket = moto_s3.bucket("takedown")
    so = moto_s3.options
    fs, _ = fsio.filesystem(f"s3://{bucket}", so)
    fs.put(str(local), f"{bucket}/root", recursive=True)
    fs.pipe(f"{bucket}/list.txt", b"http://127.0.0.1/img/3.jpg\nsample_id:%d\nsha256:%064x\n" % (10 * 7919 + 13, 25))
    root = f"s3://{bucket}/root"
    record = td.takedown(root, f"s3://{bucket}/list.txt", storage_options=so)
    assert record["items_removed"] == 3 and record["changed"]

    fs.invalidate_cache()
    back = tmp_path / "back"
    fs.get(f"{bucket}/root", str(back), recursive=True)
    assert not [p for p in back.rglob("*") if td.TMP_MARK in p.name]
    assert not list((back / "_takedown").glob("pending-*"))
    gone = {"000000003", "000000010", "000000025"}
    with tarfile.open(back / "images" / "00000.tar") as tar:
        keys = {m.name.split(".")[0] for m in tar}
    assert len(keys) == 37 and not keys & gone
    meta = {r["key"]: r for r in pq.read_table(back / "images" / "00000.parquet").to_pylist()}
    assert {k for k, r in meta.items() if r["status"] == "taken_down"} == gone
    subset_keys = [r["key"] for r in pq.read_table(back / "dataset" / "laion2B-en" / "part-0.parquet").to_pylist()]
    assert len(subset_keys) == 37 and not set(subset_keys) & gone
    ids = pq.read_table(back / "indices" / "laion2B-en" / "ids.parquet").to_pylist()
    assert [r["key"] for r in ids] == subset_keys and [r["index_id"] for r in ids] == list(range(37))
    from udfs.clip import embeddings

    img, txt, m = embeddings.read_retrieval(str(back / "dataset" / "embeddings" / "laion2B-en"))
    assert len(img) == len(txt) == len(m) == 37 and list(m["key"]) == subset_keys
    for kind in ("image", "text"):
        index = faiss.read_index(str(back / "indices" / "laion2B-en" / f"{kind}.index"))
        assert index.ntotal == 37
        assert np.allclose(index.reconstruct_n(0, 37), (img if kind == "image" else txt).astype(np.float32), atol=1e-3)
    again = td.takedown(root, f"s3://{bucket}/list.txt", storage_options=so)
    assert again["changed"] is False and again["files_changed"] == 0


def test_stage_fault_injection_and_cli_errors(tmp_path, cfg):
    """`--set testing.inject_failure=takedown:N` kills the stage before its N-th swap; the next run
    finishes the swaps. A missing list is a one-line error with exit code 2."""
    from spark_jobs import cli
    from spark_jobs.faults import InjectedFault

    root = _small_root(tmp_path)
    (tmp_path / "list.txt").write_text("http://127.0.0.1/img/7.jpg\n")
    stage = cli._load_stage("spark_jobs.takedown")
    args = argparse.Namespace(root=str(root), list_uri=str(tmp_path / "list.txt"))
    with pytest.raises(InjectedFault):
        stage.run(None, cfg.with_overrides(["testing.inject_failure=takedown:2"]), args)
    assert len(list((root / "_takedown").glob("pending-*.json"))) == 1
    done = stage.run(None, cfg, args)
    assert len(done["recovered_runs"]) == 1 and done["changed"] is False
    assert not list((root / "_takedown").glob("pending-*.json"))
    assert not [p for p in root.rglob("*") if td.TMP_MARK in p.name]
    assert "000000007" not in {r["key"] for r in pq.read_table(root / "dataset" / "laion2B-en" / "part-0.parquet").to_pylist()}

    out = subprocess.run([sys.executable, "-m", "spark_jobs.cli", "takedown", "--root", str(root),
                          "--list", str(tmp_path / "missing.txt")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and "removal list" in out.stderr and "Traceback" not in out.stderr


def test_tar_without_metadata_is_matched_by_its_json_members(tmp_path):
    """A shard copied without its parquet: samples are matched by the url/uid in KEY.json."""
    from udfs.download.shard_writer import TarShardWriter, iter_samples

    uri = str(tmp_path / "00007.tar")
    with TarShardWriter(uri) as writer:
        for i in range(5):
            rec = {"key": f"00007000{i}", "url": f"https://img{i}.example.com/{i}.jpg", "uid": f"{i:016x}"}
            writer.write(rec["key"], {"jpg": bytes([i]) * 100, "txt": b"caption", "json": json.dumps(rec).encode()})
    entries, _ = block_list.parse_list("domain:img1.example.com\nhttps://img3.example.com/3.jpg\n")
    stager = td.Stager("r1", None)
    staged = td.rewrite_tar(uri, {}, block_list.Matcher(entries), stager, "00007.tar")
    assert staged.report["samples_removed"] == 2 and staged.report["members_removed"] == 6
    (tmp, dest), = staged.swaps
    td.swap(tmp, dest, None)
    assert [s["__key__"] for s in iter_samples(uri)] == ["000070000", "000070002", "000070004"]
    assert td.rewrite_tar(uri, {}, block_list.Matcher(entries), stager, "00007.tar") is None
    assert sorted(os.listdir(tmp_path)) == ["00007.tar"]     # no staged file left when nothing matched


def test_a_damaged_file_stops_the_run_before_anything_changes(tmp_path):
    root = _small_root(tmp_path)
    (tmp_path / "list.txt").write_text("http://127.0.0.1/img/7.jpg\n")
    (root / "dataset" / "laion2B-en" / "part-1.parquet").write_bytes(b"PAR1 not really parquet")
    before = _tree_hashes(root)
    with pytest.raises(td.TakedownError, match=r"dataset/laion2B-en/part-1.parquet: .*nothing was changed"):
        td.takedown(str(root), str(tmp_path / "list.txt"))
    assert _tree_hashes(root) == before      # no staged file left, no file swapped
