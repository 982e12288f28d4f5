"""Tiny download outputs (contract 2) for clip_score tests and benchmarks, written without the
download stage: `{shard:05d}.tar` (KEY.jpg, KEY.txt, KEY.json) and `{shard:05d}.parquet`.

Each row is declared by a `Row`: the shape drawn (tests/gen/shapes.py), the caption's colour and
shape (equal to the drawing's for a matching pair), its language, its download status, and the
broken cases clip_score must handle (bytes that do not decode, a success row absent from the tar).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tests.gen import shapes


@dataclass
class Row:
    color: str = "red"
    shape: str = "circle"
    caption_color: str | None = None   # None: same as color (a matching caption)
    caption_shape: str | None = None
    lang: str = "en"
    variant: int = 0
    status: str = "success"
    corrupt: bool = False              # tar holds bytes that are not an image
    omit_from_tar: bool = False        # success in the metadata, absent from the tar
    size: int = 64
    background: str = "plain"

    @property
    def matching(self) -> bool:
        return (self.caption_color in (None, self.color)) and (self.caption_shape in (None, self.shape))

    def text(self) -> str:
        return shapes.caption(self.caption_color or self.color, self.caption_shape or self.shape,
                              self.lang, self.variant)


METADATA_TYPES = {
    "key": "string", "uid": "string", "url": "string", "text": "string", "page_url": "string",
    "shard": "int32", "status": "string", "error_message": "string", "http_status": "int32",
    "content_type": "string", "original_width": "int32", "original_height": "int32",
    "width": "int32", "height": "int32", "bytes": "int64", "sha256": "string",
    "download_seconds": "float64", "retryable": "bool", "attempts": "int32",
}


def jpeg_bytes(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_images_folder(root: str | Path, shards: list[list[Row]], seed: int = 0) -> list[dict]:
    """Write the shards under `root`; returns the metadata rows (dicts) in write order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from udfs.ids import pair_uid

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    all_rows = []
    for shard, rows in enumerate(shards):
        meta = []
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for index, row in enumerate(rows):
                key = f"{shard:05d}{index:04d}"
                url = f"http://127.0.0.1/img/{key}.jpg"
                text = row.text()
                ok = row.status == "success"
                record = {k: None for k in METADATA_TYPES}
                record.update(key=key, uid=pair_uid(url, text), url=url, text=text,
                              page_url="http://127.0.0.1/page.html", shard=shard, status=row.status,
                              error_message=None if ok else f"{row.status} (generated)",
                              http_status=200 if ok else 404, attempts=1, retryable=False)
                if ok:
                    data = (b"not an image at all" if row.corrupt else
                            jpeg_bytes(shapes.draw_shape(row.color, row.shape, row.size, row.background, rng)))
                    record.update(content_type="image/jpeg", original_width=row.size, original_height=row.size,
                                  width=row.size, height=row.size, bytes=len(data), download_seconds=0.01)
                    if not row.omit_from_tar:
                        for ext, payload in (("jpg", data), ("txt", text.encode()),
                                             ("json", json.dumps({"key": key, "url": url}).encode())):
                            info = tarfile.TarInfo(f"{key}.{ext}")
                            info.size = len(payload)
                            tar.addfile(info, io.BytesIO(payload))
                meta.append(record)
        schema = pa.schema([(k, getattr(pa, {"string": "string", "int32": "int32", "int64": "int64",
                                             "float64": "float64", "bool": "bool_"}[t])())
                            for k, t in METADATA_TYPES.items()])
        pq.write_table(pa.Table.from_pylist(meta, schema=schema), root / f"{shard:05d}.parquet")
        all_rows.extend(meta)
    return all_rows


def mixed_rows(n: int, seed: int = 0, mismatch_every: int = 2) -> list[Row]:
    """n success rows over all classes and languages; every `mismatch_every`-th caption describes
    another colour and shape (0: all matching)."""
    rng = random.Random(seed)
    classes = shapes.all_classes()
    out = []
    for i in range(n):
        color, shape = classes[i % len(classes)]
        row = Row(color=color, shape=shape, lang=shapes.LANGS[i % 3], variant=(i // 3) % shapes.N_VARIANTS,
                  size=rng.choice([48, 64, 128]), background=rng.choice(["plain", "noisy"]))
        if mismatch_every and i % mismatch_every == 1:
            row.caption_color = rng.choice([c for c in shapes.COLORS if c != color])
            row.caption_shape = rng.choice([s for s in shapes.SHAPES if s != shape])
        out.append(row)
    return out
