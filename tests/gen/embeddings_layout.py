"""Generate the filter's clip-retrieval embeddings layout (contract 4) for index tests.

`write_random_subset` writes clustered random unit vectors (float16 npy, like clip-score) with
row-aligned metadata; text vectors are noisy copies of the image vectors, as CLIP pairs are.
`write_vector_subset` writes given vectors and captions, plus a webdataset tar holding one image per
row, so thumbnails and real model queries can be tested end to end.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def clustered_vectors(n: int, dim: int, clusters: int = 16, noise: float = 0.35,
                      seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _metadata(n: int, offset: int, texts: list[str] | None, tar_path: str | None,
              punsafe: list[float | None] | None) -> pa.Table:
    ids = np.arange(offset, offset + n)
    return pa.table({
        "SAMPLE_ID": pa.array((ids * 7919 + 13).astype(np.int64)),
        "URL": [f"http://127.0.0.1/img/{i}.jpg" for i in ids],
        "TEXT": texts if texts is not None else [f"caption number {i}" for i in ids],
        "similarity": pa.array(np.full(n, 0.31)),
        "LANGUAGE": ["en"] * n,
        "punsafe": pa.array(punsafe if punsafe is not None else [None] * n, pa.float64()),
        "pwatermark": pa.array([None] * n, pa.float64()),
        "key": [f"00000{i:04d}" for i in ids],
        "tar_path": [tar_path] * n,
    })


def write_parts(root: Path, image: np.ndarray, text: np.ndarray, parts: int,
                texts: list[str] | None = None, tar_path: str | None = None,
                punsafe: list | None = None) -> Path:
    """Split the rows into `parts` files numbered 0..parts-1 (img_emb_{i}.npy, ...)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(image), parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", image[a:b].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", text[a:b].astype(np.float16))
        pq.write_table(_metadata(b - a, a, texts[a:b] if texts else None, tar_path,
                                 punsafe[a:b] if punsafe else None),
                       root / "metadata" / f"metadata_{i}.parquet")
    return root


def write_random_subset(dataset: Path, subset: str = "laion2B-en", n: int = 2000, dim: int = 32,
                        parts: int = 3, seed: int = 0, clusters: int = 16
                        ) -> tuple[Path, np.ndarray, np.ndarray]:
    """clusters=n gives structureless vectors, the worst case for IVF and HNSW."""
    image = clustered_vectors(n, dim, clusters=clusters, seed=seed)
    rng = np.random.default_rng(seed + 1)
    text = image + 0.2 * rng.standard_normal(image.shape).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    root = write_parts(dataset / "embeddings" / subset, image, text, parts)
    # Return what the index will actually see: float16-rounded vectors.
    return root, image.astype(np.float16).astype(np.float32), text.astype(np.float16).astype(np.float32)


def write_tar(path: Path, images: list, texts: list[str], first: int = 0) -> str:
    """A webdataset shard with KEY.jpg/KEY.txt/KEY.json per row (keys as in _metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, (img, text) in enumerate(zip(images, texts), start=first):
            key = f"00000{i:04d}"
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=90)
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", text.encode()),
                               (f"{key}.json", json.dumps({"key": key, "caption": text}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


TINY_CLIP_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_clip"


def tiny_clip_overrides() -> list[str]:
    """`--set` values that select the tiny model, as `--config conf/presets/tiny_clip.yaml` does."""
    return [f"clip.model=local-dir:{TINY_CLIP_DIR}", "clip.pretrained=null", "clip.device=cpu"]


def tiny_clip_missing() -> str | None:
    """Why the tiny CLIP model cannot be used here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("udfs.clip.clip_model") is None:
        return "udfs/clip/clip_model.py is not in the tree yet"
    if not (TINY_CLIP_DIR / "open_clip_config.json").exists():
        return f"the tiny CLIP model is not trained yet (run {TINY_CLIP_DIR}/train_tiny_clip.py)"
    return None


def write_shapes_subset(dataset: Path, images: Path, model, subset: str = "laion2B-en",
                        per_class: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """Shapes drawn by tests/gen/shapes.py, embedded with `model` (a udfs.clip.clip_model.ClipModel),
    one tar shard of the images, and the embeddings layout of `subset`. Returns (color, shape)
    of every row, in row order."""
    import random

    from tests.gen.shapes import all_classes, caption, draw_shape

    rng = random.Random(seed)
    classes = [c for c in all_classes() for _ in range(per_class)]
    imgs = [draw_shape(color, shape, size=64, rng=rng) for color, shape in classes]
    texts = [caption(color, shape, "en", variant=i % 2) for i, (color, shape) in enumerate(classes)]
    tar = write_tar(images / "00000.tar", imgs, texts)
    write_parts(dataset / "embeddings" / subset, model.encode_images(imgs),
                model.encode_texts(texts), 2, texts=texts, tar_path=tar)
    return classes
