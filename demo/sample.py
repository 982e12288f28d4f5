"""The demo's bundled sample: synthetic WAT files whose image URLs point at a loopback server.

The server serves shape images (tests/gen/shapes.py) whose alt-texts match or mismatch them, in
English, German and French, so the project's tiny CLIP model gives meaningful scores. The sample
also holds every kind of row the pipeline must drop, each with a known count (written to
`expected.json`), so a user can check the funnel in the report by hand:
short alt-texts, duplicates, tiny images, opted-out images (X-Robots-Tag), 404s and captions
without a language.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.gen import shapes
from tests.gen.wat_writer import pages_for_images, write_wat

CRAWL = "CC-MAIN-2024-22"
OPT_OUT_VALUES = ("noai", "noimageai", "noindex", "noimageindex")

# Share of the distinct images per kind; the rest are captions that match their image.
KIND_WEIGHTS = {
    "match": 0.58,
    "mismatch": 0.18,
    "nolang": 0.04,
    "tiny": 0.05,
    "opted_out": 0.05,
    "missing": 0.05,
    "short_alt": 0.05,
}
DUPLICATE_RATE = 0.08   # extra copies of kept links, on other pages and files


@dataclass
class SampleItem:
    url: str
    alt: str
    kind: str
    color: str
    shape: str
    lang: str


def _jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _image_bytes(color: str, shape: str, rng: random.Random, min_bytes: int = 6000) -> bytes:
    """A noisy-background shape image comfortably above the 5 KB too-small cut."""
    size = rng.randint(112, 360)
    while True:
        body = _jpeg(shapes.draw_shape(color, shape, size=size, background="noisy", rng=rng))
        if len(body) >= min_bytes:
            return body
        size += 64


def _caption(kind: str, color: str, shape: str, lang: str, rng: random.Random) -> str:
    if kind == "mismatch":
        other = rng.choice([c for c in shapes.all_classes() if c != (color, shape)])
        return shapes.caption(*other, lang=lang, variant=rng.randrange(shapes.N_VARIANTS))
    if kind == "nolang":
        return f"IMG_{rng.randrange(10000):04d}.jpg"
    if kind == "short_alt":
        return rng.choice(("img", "logo", "pic", "x"))
    return shapes.caption(color, shape, lang=lang, variant=rng.randrange(shapes.N_VARIANTS))


def build_sample(server, out_dir: str | Path, n_images: int = 240, n_files: int = 3,
                 seed: int = 0) -> dict:
    """Register the images on `server` (an ImageServer) and write `n_files` WAT files under
    `out_dir/crawl-data/CC-MAIN-2024-22/...`. Returns the WAT paths and the expected counts."""
    rng = random.Random(seed)
    out = Path(out_dir)
    kinds = list(KIND_WEIGHTS)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    items: list[SampleItem] = []
    for i in range(n_images):
        kind = rng.choices(kinds, weights)[0]
        color, shape = rng.choice(shapes.all_classes())
        lang = rng.choice(shapes.LANGS)
        path = f"/img/{kind}/{i:05d}.jpg"
        if kind == "tiny":
            body = _jpeg(shapes.draw_shape(color, shape, size=40, background="plain"), quality=70)
            server.add(path, body, "image/jpeg")
        elif kind == "opted_out":
            server.add(path, _image_bytes(color, shape, rng), "image/jpeg",
                       headers={"X-Robots-Tag": rng.choice(OPT_OUT_VALUES)})
        elif kind != "missing":          # missing: never registered, the server answers 404
            server.add(path, _image_bytes(color, shape, rng), "image/jpeg")
        items.append(SampleItem(server.url(path), _caption(kind, color, shape, lang, rng),
                                kind, color, shape, lang))

    links = [(it.url, it.alt) for it in items]
    kept = [it for it in items if it.kind != "short_alt"]
    duplicates = rng.sample(kept, max(1, int(len(kept) * DUPLICATE_RATE)))
    links += [(it.url, it.alt) for it in duplicates]
    rng.shuffle(links)

    pages = pages_for_images(links, page_base=server.url("/pages/"), per_page=4, seed=seed)
    folder = out / "crawl-data" / CRAWL / "segments" / "1715990000000.00" / "wat"
    paths = []
    per_file = -(-len(pages) // n_files)
    for f in range(n_files):
        chunk = pages[f * per_file:(f + 1) * per_file]
        if not chunk:
            continue
        name = f"{CRAWL}-20240517233122-{f:05d}.warc.wat.gz"
        write_wat(folder / name, chunk, seed=seed + f, filename=name)
        paths.append(str(folder / name))

    kind_counts = Counter(it.kind for it in items)
    expected = {
        "wat_files": paths,
        "links": len(links),
        "distinct_images": len(items),
        "kinds": dict(kind_counts),
        "duplicates": len(duplicates),
        "expected": {
            "wat-extract dropped (alt_too_short)": kind_counts["short_alt"],
            "dedup dropped (duplicate)": len(duplicates),
            "download too_small": kind_counts["tiny"],
            "download opted_out": kind_counts["opted_out"],
            "download 404": kind_counts["missing"],
        },
        "items": [it.__dict__ for it in items],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False), encoding="utf-8")
    return expected
