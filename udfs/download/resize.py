"""Decode, check, resize and re-encode one downloaded image (img2dataset's resize semantics).

Modes (img2dataset's names):
- `no`: keep the size, re-encode only;
- `keep_ratio`: the SMALLER side becomes `image_size`, aspect ratio kept;
- `center_crop`: keep_ratio, then a centred `image_size` x `image_size` crop;
- `border`: the LARGER side becomes `image_size`, then black borders pad to a square (LAION's default).

The decompression-bomb guard reads the dimensions from the header (`Image.open` is lazy) and
refuses images over `max_image_pixels` BEFORE any pixel is decoded (PIL's own bomb error, at
twice its default limit, is reported as `too_large` too). JPEGs are decoded with
`draft()`, libjpeg's DCT scaling: a 2000 px photo headed for 256 px is decoded at 1/4 or 1/8 size,
which is where most of the speed over a full decode + resize comes from.

EXIF orientation (unlike img2dataset): phone photos are often stored sideways with an EXIF tag
saying how to turn them. The tag is read from the header, the decoded pixels are transposed
upright BEFORE resizing (so `image_size` applies to the upright sides), the re-encoded image
carries no EXIF, and the tag's value is returned as `exif_orientation` (None without one).
`original_width`/`original_height` are the upright sizes, i.e. the image as a viewer sees it.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass, field

from PIL import Image

from udfs.download import image_hash

MODES = ("no", "border", "keep_ratio", "center_crop")
# EXIF tag 0x0112 -> the transpose that makes the pixels upright (the TIFF/EXIF 2.3 definitions)
EXIF_ORIENTATION_TAG = 0x0112
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
SWAPS_SIDES = (5, 6, 7, 8)
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ImageRejected(Exception):
    """A downloaded image that is not kept; `status` is its metadata status."""

    def __init__(self, status: str, message: str, width: int | None = None, height: int | None = None):
        super().__init__(message)
        self.status, self.message, self.width, self.height = status, message, width, height


@dataclass
class ResizeConfig:
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    output_format: str = "jpg"
    encode_quality: int = 95
    max_image_pixels: int = 89_478_485

    def __post_init__(self):
        if self.resize_mode not in MODES:
            raise ValueError(f"download.resize_mode must be one of {', '.join(MODES)}, got {self.resize_mode!r}")
        if self.output_format.lower() not in FORMATS:
            raise ValueError(f"download.output_format must be one of jpg, png, webp, got {self.output_format!r}")
        self.output_format = "jpg" if self.output_format.lower() == "jpeg" else self.output_format.lower()

    @classmethod
    def from_section(cls, section: dict) -> "ResizeConfig":
        return cls(**{k: v for k, v in section.items() if k in cls.__dataclass_fields__})


@dataclass
class Processed:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    timings: dict = field(default_factory=dict)   # decode / resize / encode seconds
    exif_orientation: int | None = None           # the EXIF tag of the original (1-8), None if absent
    phash: int | None = None                      # pHash of the decoded upright original (udfs.download.image_hash)


def target_size(w: int, h: int, cfg: ResizeConfig) -> tuple[int, int]:
    """Size after scaling, before cropping or padding."""
    s = cfg.image_size
    if cfg.resize_mode == "no":
        return w, h
    side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    if cfg.resize_only_if_bigger and side <= s:
        return w, h
    scale = s / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white (as img2dataset does) and convert to RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def exif_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation (1-8) of an opened image, None when absent or malformed (never fatal)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block only loses the tag, not the image
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def process_image(data: bytes, cfg: ResizeConfig) -> Processed:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            img = Image.open(io.BytesIO(data))   # lazy: parses the header only
            ow, oh = img.size
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", f"decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ImageRejected("failed_to_decode", f"{type(exc).__name__}: {exc}") from exc
    if ow * oh > cfg.max_image_pixels:
        raise ImageRejected("too_large", f"{ow}x{oh} = {ow * oh} pixels > max_image_pixels "
                            f"{cfg.max_image_pixels}", ow, oh)
    orientation = exif_orientation(img)
    swapped = orientation in SWAPS_SIDES
    if swapped:
        ow, oh = oh, ow                  # sizes of the upright image
    tw, th = target_size(ow, oh, cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if img.format == "JPEG" and (tw, th) != (ow, oh):
                # DCT-scaled decode, never below the target size (asked in stored orientation)
                img.draft("RGB", (th, tw) if swapped else (tw, th))
            img.load()
            img = _to_rgb(img)
            if orientation in UPRIGHT:
                img = img.transpose(UPRIGHT[orientation])
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt pixel data
        raise ImageRejected("failed_to_decode", f"{type(exc).__name__}: {exc}", ow, oh) from exc
    t1 = time.perf_counter()
    if img.size != (tw, th):
        down = tw < img.size[0]
        img = img.resize((tw, th), Image.Resampling.BOX if down else Image.Resampling.LANCZOS,
                         reducing_gap=None)
    # pHash of the upright picture at its scaled size, before crop or border: pHash shrinks to 32 x 32
    # anyway, and hashing these pixels costs ~0.2 ms where a second decode of the original for the
    # hash would cost ~2 ms (measured on a 1024 x 768 JPEG)
    ph = image_hash.phash(img)
    s = cfg.image_size
    if cfg.resize_mode == "center_crop" and (tw > s or th > s):
        left, top = (tw - min(tw, s)) // 2, (th - min(th, s)) // 2
        img = img.crop((left, top, left + min(tw, s), top + min(th, s)))
    elif cfg.resize_mode == "border" and (tw, th) != (s, s) and tw <= s and th <= s:
        canvas = Image.new("RGB", (s, s), (0, 0, 0))
        canvas.paste(img, ((s - tw) // 2, (s - th) // 2))
        img = canvas
    t2 = time.perf_counter()
    out = io.BytesIO()
    fmt = FORMATS[cfg.output_format]
    if fmt == "PNG":
        img.save(out, fmt)
    else:
        img.save(out, fmt, quality=int(cfg.encode_quality))
    t3 = time.perf_counter()
    return Processed(out.getvalue(), img.size[0], img.size[1], ow, oh,
                     {"decode": t1 - t0, "resize": t2 - t1, "encode": t3 - t2}, orientation, ph)
