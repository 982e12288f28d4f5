"""The HTTP API of `clipcrawl serve` on 127.0.0.1: good queries, safety cut, thumbnails, and bad
requests that must get a clear 4xx JSON error without hurting the server."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from serving.http import make_server
from serving.service import KnnService
from tests.gen.embeddings_layout import clustered_vectors, write_parts, write_tar
from udfs.index import build, search, tuning

N, DIM = 60, 16
UNSAFE = set(range(10))  # rows 0-9 carry punsafe 0.9
COLORS = [(255, 0, 0), (0, 160, 0), (0, 0, 255)]
SERVED: dict = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory, cfg):
    tmp = tmp_path_factory.mktemp("serve")
    image = clustered_vectors(N, DIM, clusters=6, seed=3)
    text = clustered_vectors(N, DIM, clusters=6, seed=4)
    tar = write_tar(tmp / "images" / "00000.tar",
                    [Image.new("RGB", (32, 32), COLORS[i % 3]) for i in range(N)],
                    [f"caption number {i}" for i in range(N)])
    punsafe = [0.9 if i in UNSAFE else 0.1 for i in range(N)]
    root = write_parts(tmp / "dataset" / "embeddings" / "laion2B-en", image, text, 2,
                       tar_path=tar, punsafe=punsafe)
    build.build_subset(str(root), str(tmp / "indices" / "laion2B-en"),
                     tuning.BuildParams(recall_sample=20, nb_cores=2))
    service = KnnService(search.open_indices(str(tmp / "indices")), cfg.section("serve"), encoder=None)
    srv = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    SERVED["text"] = text.astype(np.float16).astype(np.float32)
    SERVED["indices"] = str(tmp / "indices")
    yield f"http://127.0.0.1:{srv.server_address[1]}", image.astype(np.float16).astype(np.float32)
    srv.shutdown()
    srv.server_close()


def call(base, path, body=None, raw: bytes | None = None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            payload = resp.read()
            ctype = resp.headers["Content-Type"]
            return resp.status, (json.loads(payload) if ctype.startswith("application/json") else payload)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_indices_list_and_info(server):
    base, _ = server
    assert call(base, "/indices-list") == (200, ["laion2B-en"])
    status, info = call(base, "/info")
    assert status == 200 and info["indices"]["laion2B-en"]["size"] == N
    assert info["text_and_image_queries"] is False


def test_embedding_query_finds_the_row(server):
    base, image = server
    status, results = call(base, "/knn-service", {"embedding_input": image[33].tolist(),
                                                  "num_images": 5, "indice_name": "laion2B-en"})
    assert status == 200 and len(results) == 5
    assert results[0]["url"].endswith("/33.jpg") and results[0]["caption"] == "caption number 33"
    assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    exact = np.argsort(-(image @ image[33]))[:5]
    assert {int(r["url"].rsplit("/", 1)[1][:-4]) for r in results} == set(exact.tolist())


def test_safety_model_drops_unsafe_results(server):
    base, image = server
    body = {"embedding_input": image[3].tolist(), "num_images": 20}
    _, plain = call(base, "/knn-service", {**body, "use_safety_model": False})
    _, safe = call(base, "/knn-service", {**body, "use_safety_model": True})
    rows = lambda res: {int(r["url"].rsplit("/", 1)[1][:-4]) for r in res}  # noqa: E731
    assert 3 in rows(plain)
    assert not rows(safe) & UNSAFE
    assert all(r["punsafe"] <= 0.5 for r in safe)


def test_text_modality_and_metadata(server):
    base, _ = server
    text = SERVED["text"][40]
    status, results = call(base, "/knn-service", {"embedding_input": text.tolist(),
                                                  "modality": "text", "num_images": 1})
    assert status == 200 and results[0]["url"].endswith("/40.jpg")
    assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    status, meta = call(base, "/metadata", {"ids": [results[0]["id"]], "indice_name": "laion2B-en"})
    assert status == 200 and meta[0]["metadata"]["url"] == results[0]["url"]


def test_thumbnail_is_read_from_the_shard(server):
    base, image = server
    _, results = call(base, "/knn-service", {"embedding_input": image[4].tolist(), "num_images": 1})
    status, data = call(base, results[0]["thumbnail"])
    assert status == 200
    pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((16, 16))
    assert np.allclose(pixel, COLORS[4 % 3], atol=12)


@pytest.mark.parametrize("body, status, message", [
    ({"text": ""}, 400, "text is empty"),
    ({"text": "   "}, 400, "text is empty"),
    ({}, 400, "give one of"),
    ({"text": "a red circle"}, 503, "CLIP model"),
    ({"embedding_input": [0.1] * DIM, "num_images": 10**6}, 400, "num_images must be between"),
    ({"embedding_input": [0.1] * DIM, "num_images": 0}, 400, "num_images must be between"),
    ({"embedding_input": [0.1] * DIM, "num_images": "many"}, 400, "num_images must be an integer"),
    ({"embedding_input": [0.1] * DIM, "num_result_ids": 10**9}, 400, "num_result_ids"),
    ({"embedding_input": [0.1] * (DIM + 1)}, 400, "dimension"),
    ({"embedding_input": [0.0] * DIM}, 400, "not all zeros"),
    ({"embedding_input": "abc"}, 400, "list of numbers"),
    ({"embedding_input": [0.1] * DIM, "modality": "audio"}, 400, "modality"),
    ({"embedding_input": [0.1] * DIM, "indice_name": "nope"}, 404, "unknown indice_name"),
    ({"embedding_input": [0.1] * DIM, "use_safety_model": "yes"}, 400, "true or false"),
    ({"image": base64.b64encode(b"this is not an image").decode()}, 400, "could not be decoded"),
    ({"image": "%%% not base64 %%%"}, 400, "base64"),
    ({"image_url": "http://127.0.0.1:9/x.jpg"}, 400, "never fetches"),
    ({"text": 42}, 400, "text must be a string"),
])
def test_bad_queries_get_clear_4xx(server, body, status, message):
    base, _ = server
    got_status, got = call(base, "/knn-service", body)
    assert got_status == status
    assert message in got["error"]


def test_bad_bodies_and_routes_then_server_still_answers(server):
    base, image = server
    assert call(base, "/knn-service", raw=b"{not json")[0] == 400
    assert call(base, "/knn-service", raw=b"[1, 2]")[1]["error"].startswith("the request body must be")
    assert call(base, "/knn-service", raw=b"\xff\xfe")[0] == 400
    assert call(base, "/nowhere")[0] == 404
    assert call(base, "/thumbnail?indice_name=laion2B-en&id=abc")[0] == 400
    assert call(base, f"/thumbnail?indice_name=laion2B-en&id={N + 5}")[0] == 404
    assert call(base, "/metadata", {"ids": [-1]})[0] == 404
    # An oversized body is refused from its Content-Length, before it is read.
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=20)
    conn.putrequest("POST", "/knn-service")
    conn.putheader("Content-Length", str(200 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "larger than" in json.loads(resp.read())["error"]
    conn.close()
    assert call(base, "/health") == (200, {"ok": True})
    status, results = call(base, "/knn-service", {"embedding_input": image[0].tolist(), "num_images": 2})
    assert status == 200 and len(results) == 2


def test_page_is_served(server):
    base, _ = server
    with urllib.request.urlopen(base + "/", timeout=20) as resp:
        html = resp.read().decode()
    assert resp.headers["Content-Type"].startswith("text/html")
    assert 'id="search-form"' in html and "/knn-service" in html


@pytest.mark.slow
def test_build_service_checks_index_and_model(server, tmp_path, cfg):
    from spark_jobs import serve
    from spark_jobs.datasets import InputError
    from tests.gen.embeddings_layout import tiny_clip_missing, tiny_clip_overrides

    with pytest.raises(InputError, match="does not exist"):
        serve.build_service(cfg, str(tmp_path / "missing"), with_model=False)
    indices = _served_indices_root()
    assert serve.build_service(cfg, indices, with_model=False).encoder is None
    if tiny_clip_missing() is None:  # the tiny model's width is not the 16-d test index's
        with pytest.raises(InputError, match="-d vectors but these indices are not"):
            serve.build_service(cfg.with_overrides(tiny_clip_overrides()), indices)
    with pytest.raises(InputError, match="cannot load the query model"):
        serve.build_service(cfg.with_overrides([f"clip.model=local-dir:{tmp_path}", "clip.pretrained=null"]),
                            indices)


@pytest.mark.slow
def test_serve_command_starts_and_answers(server):
    """`python -m spark_jobs.serve` as a user runs it (port 0 picks a free port), then stopped."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "spark_jobs.serve", "--index", _served_indices_root(),
                             "--no-model", "--port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving laion2B-en on http://127.0.0.1:" in line
        base = line.split(" on ", 1)[1].strip().rstrip("/")
        assert call(base, "/indices-list") == (200, ["laion2B-en"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _served_indices_root() -> str:
    return SERVED["indices"]


# --- several subsets, filters, "search similar", page links (the search page's API) -------------

M = 40  # rows per subset below


def _write_subset(tmp, name: str, image: np.ndarray, langs, sizes, punsafe, first_key: int) -> str:
    """A subset's embeddings layout with sizes, languages and a shard whose json has page_url."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp / "dataset" / "embeddings" / name
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tar_path = tmp / "images" / f"{name}.tar"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    keys = [f"{first_key + i:09d}" for i in range(M)]
    with tarfile.open(tar_path, "w") as tar:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), COLORS[i % 3]).save(buf, "JPEG")
            js = json.dumps({"key": key, "page_url": f"https://pages.example/{name}/{i}.html"}).encode()
            for member, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", js)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    np.save(root / "img_emb" / "img_emb_0.npy", image.astype(np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", image.astype(np.float16))
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array(np.arange(M) + first_key, pa.int64()),
        "URL": [f"http://127.0.0.1/{name}/{i}.jpg" for i in range(M)],
        "TEXT": [f"{name} caption {i}" for i in range(M)],
        "similarity": pa.array(np.full(M, 0.3)), "LANGUAGE": langs,
        "punsafe": pa.array(punsafe, pa.float64()), "pwatermark": pa.array([None] * M, pa.float64()),
        "key": keys, "tar_path": [str(tar_path)] * M,
        "WIDTH": pa.array([w for w, _ in sizes], pa.int32()), "HEIGHT": pa.array([h for _, h in sizes], pa.int32()),
    }), root / "metadata" / "metadata_0.parquet")
    return str(root)


@pytest.fixture(scope="module")
def multi(tmp_path_factory, cfg):
    tmp = tmp_path_factory.mktemp("serve_multi")
    vectors = clustered_vectors(2 * M, DIM, clusters=4, seed=11)
    en, de = vectors[:M], vectors[M:]
    sizes = [(64 + 16 * i, 48 + 8 * i) for i in range(M)]
    # en: punsafe known for even rows (every 4th unsafe), unknown for odd rows; de: German/French
    punsafe = [None if i % 2 else (0.9 if i % 4 == 0 else 0.1) for i in range(M)]
    roots = {"laion2B-en": _write_subset(tmp, "laion2B-en", en, ["en"] * M, sizes, punsafe, 0),
             "laion2B-multi": _write_subset(tmp, "laion2B-multi", de, ["de" if i % 2 else "fr" for i in range(M)],
                                            sizes, [0.1] * M, 1000)}
    for name, root in roots.items():
        build.build_subset(root, str(tmp / "indices" / name), tuning.BuildParams(recall_sample=10, nb_cores=2))
    service = KnnService(search.open_indices(str(tmp / "indices")), cfg.section("serve"), encoder=None)
    srv = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731 - what the index holds
    yield {"base": f"http://127.0.0.1:{srv.server_address[1]}", "en": f16(en), "de": f16(de),
           "sizes": sizes, "punsafe": punsafe, "tmp": tmp, "service": service, "cfg": cfg}
    srv.shutdown()
    srv.server_close()


def _row(r) -> tuple[str, int]:
    return r["subset"], int(r["url"].rsplit("/", 1)[1][:-4])


def test_all_subsets_are_searched_and_merged_by_score(multi):
    base, en, de = multi["base"], multi["en"], multi["de"]
    query = (en[5] + de[7]) / 2  # halfway between a row of each subset
    status, merged = call(base, "/knn-service", {"embedding_input": query.tolist(), "num_images": 10})
    assert status == 200 and len(merged) == 10
    assert {r["subset"] for r in merged} == {"laion2B-en", "laion2B-multi"}
    scores = [r["similarity"] for r in merged]
    assert scores == sorted(scores, reverse=True)
    # the merged top 10 is the exact top 10 over both subsets together
    q = query / np.linalg.norm(query)
    everything = [("laion2B-en", i, float(en[i] @ q) / np.linalg.norm(en[i])) for i in range(M)] + \
                 [("laion2B-multi", i, float(de[i] @ q) / np.linalg.norm(de[i])) for i in range(M)]
    exact = sorted(everything, key=lambda t: -t[2])[:10]
    assert {_row(r) for r in merged} == {(s, i) for s, i, _ in exact}
    assert call(base, "/knn-service", {"embedding_input": query.tolist(), "indice_name": "all",
                                       "num_images": 10})[1] == merged
    _, one = call(base, "/knn-service", {"embedding_input": query.tolist(), "num_images": 10,
                                         "indice_name": "laion2B-multi"})
    assert {r["subset"] for r in one} == {"laion2B-multi"}


def test_result_carries_size_language_subset_and_source_page(multi):
    base, en = multi["base"], multi["en"]
    _, results = call(base, "/knn-service", {"embedding_input": en[9].tolist(), "num_images": 1,
                                             "indice_name": "laion2B-en"})
    r = results[0]
    assert _row(r) == ("laion2B-en", 9)
    assert (r["width"], r["height"]) == multi["sizes"][9] and r["size_known"] is True
    assert r["LANGUAGE"] == "en" and r["page_url"] == "https://pages.example/laion2B-en/9.html"
    assert r["safety_scored"] is False and "punsafe" not in r   # row 9 has no punsafe
    assert call(base, r["thumbnail"])[0] == 200
    status, info = call(base, "/info")
    assert info["languages"] == ["de", "en", "fr"] and info["punsafe_threshold"] == 0.5


def test_filters_language_min_similarity_size_and_unsafe(multi):
    base, en, de = multi["base"], multi["en"], multi["de"]
    query = (en[2] + de[2]) / 2
    body = {"embedding_input": query.tolist(), "num_images": 80, "deduplicate": False}
    _, everything = call(base, "/knn-service", body)
    assert len(everything) == 2 * M
    _, german = call(base, "/knn-service", {**body, "language": "de"})
    assert german and {r["LANGUAGE"] for r in german} == {"de"} and len(german) == M // 2
    cut = sorted(r["similarity"] for r in everything)[len(everything) // 2]
    _, close = call(base, "/knn-service", {**body, "min_similarity": cut})
    assert close and all(r["similarity"] >= cut for r in close)
    assert len(close) == sum(r["similarity"] >= cut for r in everything)
    _, big = call(base, "/knn-service", {**body, "min_width": 400, "min_height": 200})
    want = {i for i, (w, h) in enumerate(multi["sizes"]) if w >= 400 and h >= 200}
    assert big and {_row(r)[1] for r in big} == want and all(r["width"] >= 400 for r in big)
    _, safe = call(base, "/knn-service", {**body, "hide_unsafe": True, "indice_name": "laion2B-en"})
    unsafe = {i for i, p in enumerate(multi["punsafe"]) if p is not None and p > 0.5}
    assert {_row(r)[1] for r in safe} == set(range(M)) - unsafe
    unscored = [r for r in safe if not r["safety_scored"]]
    assert {_row(r)[1] for r in unscored} == {i for i, p in enumerate(multi["punsafe"]) if p is None}
    for bad in ({"min_similarity": "high"}, {"min_width": -3}, {"language": 7}, {"hide_unsafe": "no"}):
        status, err = call(base, "/knn-service", {**body, **bad})
        assert status == 400 and err["error"], bad


def test_embedding_of_a_row_searches_similar(multi, tmp_path):
    base, de = multi["base"], multi["de"]
    status, got = call(base, "/embedding?indice_name=laion2B-multi&id=0")
    assert status == 200 and got["source"] == "embeddings"
    # index id 0 is the first row of the only part: multi row 0
    want = de[0] / np.linalg.norm(de[0])
    assert np.allclose(got["embedding"], want, atol=1e-4)
    _, results = call(base, "/knn-service", {"embedding_input": got["embedding"], "num_images": 3})
    assert _row(results[0]) == ("laion2B-multi", 0) and results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert call(base, "/embedding?indice_name=laion2B-multi&id=999")[0] == 404
    assert call(base, "/embedding?indice_name=nope&id=0")[0] == 404
    assert call(base, "/embedding?indice_name=laion2B-multi&id=x")[0] == 400
    # The embeddings folder gone: the vector is reconstructed from the index, same neighbour first.
    from serving.service import KnnService

    indices = search.open_indices(str(multi["tmp"] / "indices"))
    for idx in indices.values():
        idx.infos["subset_root"] = str(tmp_path / "moved")
    service = KnnService(indices, multi["cfg"].section("serve"), encoder=None)
    rebuilt = service.embedding("laion2B-multi", 0)
    assert rebuilt["source"] == "index"
    top = service.knn({"embedding_input": rebuilt["embedding"], "num_images": 1})
    assert _row(top[0]) == ("laion2B-multi", 0)
