"""Make the README screenshots from a demo run (`python -m demo --out DEMO`):

    python docs/img/screenshots.py DEMO

1. report_threshold_grid.png: the "Around the threshold" grid of DEMO/report/report.html, opened
   from disk (file://) as a user would;
2. search_page.png: `clipcrawl serve` on DEMO's indices with the tiny CLIP model, a shared link.
Headless Debian Chromium through Playwright (`make install-browser`); the PNGs are quantised to
64 colours so each stays under 200 KB.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def shrink(path: Path) -> None:
    img = Image.open(path).convert("RGB")
    img.quantize(64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {img.size[0]}x{img.size[1]}, {path.stat().st_size / 1024:.0f} KB")


def main(demo: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = 8765
    server = subprocess.Popen([sys.executable, "-m", "spark_jobs.serve", "--index", str(demo / "run" / "indices"),
                               "--config", str(REPO / "conf" / "presets" / "tiny_clip.yaml"),
                               "--port", str(port), "--log-level", "WARNING"], cwd=REPO)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto((demo / "report" / "report.html").resolve().as_uri())
            # page coordinates (a full-page clip is relative to the page, not the viewport)
            top, bottom = page.evaluate("""() => {
                const y = (el) => el.getBoundingClientRect().top + window.scrollY;
                const grid = document.querySelector('#threshold-grid');
                return [y(document.querySelector('#threshold')), y(grid) + grid.offsetHeight]; }""")
            page.screenshot(path=str(HERE / "report_threshold_grid.png"), full_page=True,
                            clip={"x": 0, "y": top - 8, "width": 1100, "height": min(bottom - top + 16, 580)})  # two rows each side
            page = browser.new_page(viewport={"width": 1280, "height": 640})
            page.goto(f"http://127.0.0.1:{port}/?q=a+red+circle&k=12")
            page.wait_for_function("document.querySelector('#status').textContent.includes('results')")
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            page.screenshot(path=str(HERE / "search_page.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name in ("report_threshold_grid.png", "search_page.png"):
        shrink(HERE / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
