"""End to end in a real browser: Debian's headless Chromium (`make install-browser`), driven by
Playwright, loads the search page served on 127.0.0.1, searches by text and by uploaded image,
and finds the expected shape among the results, with its thumbnail read from the tar shard.
A screenshot of each result page is saved under the test's tmp folder (path printed)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from tests.gen.embeddings_layout import tiny_clip_missing, tiny_clip_overrides, write_shapes_subset
from udfs import knn

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


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
    from udfs.clip_model import load_clip

    tmp = tmp_path_factory.mktemp("browser")
    run_cfg = cfg.with_overrides(tiny_clip_overrides())
    model = load_clip(run_cfg.get("clip.model"), None, device="cpu")
    write_shapes_subset(tmp / "dataset", tmp / "images", model, per_class=2)
    knn.build_subset(str(tmp / "dataset" / "embeddings" / "laion2B-en"),
                     str(tmp / "indices" / "laion2B-en"), knn.BuildParams(recall_sample=20, nb_cores=2))
    encoder = knn.QueryEncoder(run_cfg.section("clip"))
    encoder._model = model  # the model loaded above; serve would load the same config itself
    service = KnnService(knn.open_indices(str(tmp / "indices")), run_cfg.section("serve"), encoder)
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


def _results(page) -> list[dict]:
    page.wait_for_selector("#results .result", timeout=30_000)
    return page.eval_on_selector_all(
        "#results .result",
        """cards => cards.map(c => ({caption: c.querySelector('.caption').textContent,
                                     score: Number(c.querySelector('.score').textContent),
                                     thumbWidth: c.querySelector('img').naturalWidth}))""")


def _save(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_text_search_shows_the_shape_with_thumbnail(page_url, browser):
    url, tmp = page_url
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url)
    page.wait_for_selector("#subset option[value='laion2B-en']", state="attached")
    page.fill("#query", "a red circle")
    page.fill("#k", "8")
    page.click("#search")
    results = _results(page)
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
    results = _results(page)
    assert len(results) == 8
    assert "red circle" in results[0]["caption"]
    assert results[0]["thumbWidth"] > 0  # the thumbnail came from the tar shard
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert "8 results" in page.text_content("#status")
    _save(page, tmp / "search_text.png")
    shutil.copy(tmp / "search_text.png", tmp.parent / "clipcrawl_search_text.png")
    page.close()


def test_image_upload_search_and_error_message(page_url, browser):
    from tests.gen.shapes import draw_shape

    url, tmp = page_url
    draw_shape("blue", "star", size=64).save(tmp / "blue_star.png")
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url)
    page.set_input_files("#image", str(tmp / "blue_star.png"))
    page.click("#search")
    results = _results(page)
    assert "blue star" in results[0]["caption"]
    _save(page, tmp / "search_image.png")

    # An empty query is refused by the API and the page shows its message.
    page.set_input_files("#image", [])
    page.fill("#query", "")
    page.click("#search")
    page.wait_for_selector("#status.error")
    assert "text is empty" in page.text_content("#status")
    page.close()
