"""Photo-like generated images for the image-dedup tests and benchmark, and the edits a copy of a
photo goes through on the web (resize, re-encode, crop, brightness, a caption overlay).

`noise_image` (image_server.py) is mostly pixel noise, whose low DCT frequencies are near zero,
so its pHash bits are unstable; real photos have structure at every scale. `photo_like` draws a
smooth random colour field (a 6 x 5 grid upsampled bicubically), a few random ellipses and
rectangles, and mild pixel noise: pHash behaves on it as on photos (copies close, different
images ~32 bits apart). Everything is drawn from the seed; no external data.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

TRANSFORMS = ("resize50", "jpeg30", "crop5", "bright10", "overlay")


def photo_like(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    field = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    img = Image.fromarray(field, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def transform(img: Image.Image, name: str, seed: int = 0) -> bytes:
    """The encoded bytes of one edited copy of `img` (JPEG q90 unless the edit is the encoding)."""
    w, h = img.size
    if name == "resize50":
        return jpeg(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS))
    if name == "jpeg30":
        return jpeg(img, 30)
    if name == "crop5":   # 5% off each side
        dx, dy = round(w * 0.05), round(h * 0.05)
        return jpeg(img.crop((dx, dy, w - dx, h - dy)))
    if name == "bright10":
        return jpeg(ImageEnhance.Brightness(img).enhance(1.10))
    if name == "overlay":  # a small caption in a corner, as a watermark or a meme font would be
        out = img.copy()
        draw = ImageDraw.Draw(out)
        rng = np.random.default_rng(seed)
        x, y = int(rng.integers(5, w // 3)), int(rng.integers(h - 40, h - 15))
        draw.rectangle((x - 2, y - 2, x + 92, y + 12), fill=(0, 0, 0))
        draw.text((x, y), f"photo #{seed % 10000}", fill=(255, 255, 255))
        return jpeg(out)
    raise ValueError(f"unknown transform {name!r}; choose one of {TRANSFORMS}")
