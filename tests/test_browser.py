"""End to end in a real browser: Debian's headless Chromium (`make install-browser`), driven by
Playwright, loads the search page served on 127.0.0.1 over two subsets of shape images embedded
with the tiny CLIP model, and checks what a user does: open a shared link, change a filter, go
back, "search similar", upload an image, search with Enter, and read the page at 1280 and 375 px.
Screenshots are saved under the test's tmp folder (paths printed) and copied beside it as
clipcrawl_search_*.png so they are easy to find and look at."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from tests.gen.embeddings_layout import tiny_clip_missing, tiny_clip_overrides
from udfs.index import build, search, tuning

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _write_subset(tmp: Path, name: str, model, rows: list[tuple[str, str, str, int]], first_key: int) -> str:
    """rows: (colour, shape, lang, variant). Writes a shard (image, caption, json with page_url),
    the embeddings layout with sizes/languages/punsafe, and returns the subset root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.gen.shapes import caption, draw_shape

    rng = __import__("random").Random(first_key)
    images = [draw_shape(c, s, size=96, rng=rng) for c, s, _, _ in rows]
    texts = [caption(c, s, lang, variant=v) for c, s, lang, v in rows]
    keys = [f"{first_key + i:09d}" for i in range(len(rows))]
    tar_path = tmp / "images" / f"{name}.tar"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        for i, (key, img, text) in enumerate(zip(keys, images, texts)):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            js = {"key": key, "caption": text, "page_url": f"http://127.0.0.1:9/{name}/page-{i}.html"}
            for member, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", text.encode()),
                                 (f"{key}.json", json.dumps(js).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    root = tmp / "dataset" / "embeddings" / name
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0.npy", np.asarray(model.encode_images(images), np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", np.asarray(model.encode_texts(texts), np.float16))
    n = len(rows)
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array(np.arange(n) + first_key, pa.int64()),
        "URL": [f"http://127.0.0.1:9/{name}/{i}.jpg" for i in range(n)],
        "TEXT": texts, "similarity": pa.array(np.full(n, 0.3)),
        "LANGUAGE": [lang for _, _, lang, _ in rows],
        # every third row has no safety score (kept and marked by "hide unsafe")
        "punsafe": pa.array([None if i % 3 == 2 else 0.05 for i in range(n)], pa.float64()),
        "pwatermark": pa.array([None] * n, pa.float64()),
        "key": keys, "tar_path": [str(tar_path)] * n,
        "WIDTH": pa.array([320 + 40 * (i % 8) for i in range(n)], pa.int32()),
        "HEIGHT": pa.array([240 + 30 * (i % 8) for i in range(n)], pa.int32()),
    }), root / "metadata" / "metadata_0.parquet")
    return str(root)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, cfg):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed: run `make install-browser` (Debian chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    reason = tiny_clip_missing()
    if reason:
        pytest.skip(reason)
    from serving.http import make_server
    from serving.service import KnnService
    from tests.gen.shapes import all_classes
    from udfs.clip.clip_model import load_clip

    tmp = tmp_path_factory.mktemp("browser")
    run_cfg = cfg.with_overrides(tiny_clip_overrides())
    model = load_clip(run_cfg.get("clip.model"), None, device="cpu")
    classes = all_classes()
    roots = {
        "laion2B-en": _write_subset(tmp, "laion2B-en", model,
                                    [(c, s, "en", v) for c, s in classes for v in (0, 1)], 0),
        "laion2B-multi": _write_subset(tmp, "laion2B-multi", model,
                                       [(c, s, lang, 0) for c, s in classes for lang in ("de", "fr")], 1000),
    }
    for name, root in roots.items():
        build.build_subset(root, str(tmp / "indices" / name), tuning.BuildParams(recall_sample=20, nb_cores=2))
    encoder = search.QueryEncoder(run_cfg.section("clip"))
    encoder._model = model  # the model loaded above; serve would load the same config itself
    service = KnnService(search.open_indices(str(tmp / "indices")), run_cfg.section("serve"), encoder)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", tmp
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


CARDS_JS = """cards => cards.map(c => ({
    caption: c.querySelector('.caption').textContent,
    score: Number(c.querySelector('.score').textContent),
    lang: c.querySelector('.lang').textContent,
    size: c.querySelector('.size').textContent,
    subset: c.querySelector('.subset').textContent,
    unscored: !!c.querySelector('.unscored'),
    alt: c.querySelector('img').alt,
    source: c.querySelector('a.source').href,
    thumbWidth: c.querySelector('img').naturalWidth}))"""


def _is(caption: str, color: str, shape: str) -> bool:
    """The caption names this shape, in any language and phrasing the fixture used."""
    from tests.gen.shapes import N_VARIANTS
    from tests.gen.shapes import caption as make

    return caption in {make(color, shape, lang, v) for lang in ("en", "de", "fr") for v in range(N_VARIANTS)}


def _results(page, wait_status: str | None = None) -> list[dict]:
    page.wait_for_selector("#results .result", timeout=30_000)
    if wait_status:
        page.wait_for_function(f"document.querySelector('#status').textContent.includes({wait_status!r})",
                               timeout=30_000)
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
    return page.eval_on_selector_all("#results .result", CARDS_JS)


def _params(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def _save(page, tmp: Path, name: str) -> Path:
    path = tmp / name
    page.screenshot(path=str(path), full_page=True)
    shutil.copy(path, tmp.parent / f"clipcrawl_{name}")
    print(f"screenshot: {path} (copy: {tmp.parent / f'clipcrawl_{name}'})")
    return path


def _wait_new_search(page, before: str) -> None:
    """Wait until the status line changes from `before` and reports results."""
    page.wait_for_function(
        "b => { const t = document.querySelector('#status').textContent; return t !== b && / results in /.test(t); }",
        arg=before, timeout=30_000)


def test_shared_link_runs_its_search_on_load(page_url, browser):
    url, tmp = page_url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "?q=a+red+circle&subset=laion2B-en&k=8")
    results = _results(page, "8 results")
    assert len(results) == 8
    assert "red circle" in results[0]["caption"]
    assert results[0]["thumbWidth"] > 0                     # read from the tar shard
    assert all(r["subset"] == "laion2B-en" for r in results)
    assert all(r["alt"] == r["caption"] for r in results)   # alt text is the caption
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["source"].startswith("http://127.0.0.1:9/laion2B-en/page-")  # the page, not the image
    assert page.input_value("#query") == "a red circle" and page.input_value("#subset") == "laion2B-en"
    assert page.input_value("#k") == "8"
    _save(page, tmp, "search_1280.png")
    page.close()


def test_all_subsets_by_default_then_filters_change_the_url_and_back_works(page_url, browser):
    url, tmp = page_url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector("#language option[value='de']", state="attached")
    assert page.input_value("#subset") == ""                 # "All subsets"
    page.fill("#query", "a red circle")
    page.press("#query", "Enter")                            # Enter searches
    results = _results(page, "in all subsets")
    assert _params(page) == {"q": "a red circle"}
    assert {r["subset"] for r in results} == {"laion2B-en", "laion2B-multi"}
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert any(r["unscored"] for r in results)               # rows without punsafe are kept and marked

    before = page.text_content("#status")
    page.select_option("#language", "de")
    _wait_new_search(page, before)
    assert _params(page) == {"q": "a red circle", "language": "de"}
    german = _results(page)
    assert german and {r["lang"] for r in german} == {"de"}
    assert "Kreis" in german[0]["caption"] and "rot" in german[0]["caption"]

    before = page.text_content("#status")
    page.fill("#min_width", "500")
    page.press("#min_width", "Enter")
    _wait_new_search(page, before)
    assert _params(page)["min_width"] == "500"
    wide = _results(page)
    assert wide and all(int(r["size"].split("×")[0]) >= 500 for r in wide)

    before = page.text_content("#status")
    page.go_back()                                           # back to the language-only search
    _wait_new_search(page, before)
    assert _params(page) == {"q": "a red circle", "language": "de"}
    assert page.input_value("#min_width") == ""
    assert len(_results(page)) == len(german)
    before = page.text_content("#status")
    page.go_back()
    _wait_new_search(page, before)
    assert _params(page) == {"q": "a red circle"} and page.input_value("#language") == ""
    before = page.text_content("#status")
    page.go_forward()
    _wait_new_search(page, before)
    assert _params(page)["language"] == "de"
    page.close()


def test_search_similar_uses_the_result_embedding(page_url, browser):
    url, tmp = page_url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "?q=a+blue+star&k=6")
    first = _results(page, "6 results")[0]
    assert _is(first["caption"], "blue", "star")
    before = page.text_content("#status")
    page.click("#results .result >> nth=0 >> button.similar")
    _wait_new_search(page, before)
    params = _params(page)
    assert "q" not in params and params["similar"].split(":")[0] == first["subset"]
    similar = _results(page)
    # the result's own image is its nearest neighbour, at cosine 1, and is a blue star
    assert similar[0]["caption"] == first["caption"] and similar[0]["score"] >= 0.999
    assert "similar to" in page.text_content("#status")
    assert any(_is(r["caption"], "blue", "star") for r in similar[1:4]), similar[:4]
    page.reload()                                            # the similar search is a link too
    assert _results(page, "similar to")[0]["caption"] == first["caption"]
    page.close()


def test_phone_width_and_image_upload(page_url, browser):
    from tests.gen.shapes import draw_shape

    url, tmp = page_url
    page = browser.new_page(viewport={"width": 375, "height": 800})
    page.goto(url + "?q=a+green+square&k=10")
    results = _results(page, "10 results")
    assert _is(results[0]["caption"], "green", "square")
    # nothing wider than the screen: no sideways scrolling on a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    boxes = page.eval_on_selector_all("#results .result", "cs => cs.map(c => c.getBoundingClientRect().right)")
    assert max(boxes) <= 375
    _save(page, tmp, "search_375.png")

    draw_shape("yellow", "triangle", size=64).save(tmp / "yellow_triangle.png")
    page.fill("#query", "")
    page.set_input_files("#image", str(tmp / "yellow_triangle.png"))
    before = page.text_content("#status")
    page.click("#search")
    _wait_new_search(page, before)
    assert _is(_results(page)[0]["caption"], "yellow", "triangle")

    # An empty query is refused by the API and the page shows its message.
    page.set_input_files("#image", [])
    page.fill("#query", "")
    page.click("#search")
    page.wait_for_selector("#status.error")
    assert "text is empty" in page.text_content("#status")
    page.close()
