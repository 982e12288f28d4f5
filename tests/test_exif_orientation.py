"""EXIF orientation: a photo stored sideways with an orientation tag comes out of the download
stage upright, checked on the pixels, and the tag is recorded in `exif_orientation`.

The stored (sideways) pixels are made from an upright picture with numpy, straight from the
EXIF 2.3 definitions of what a viewer must do to display each orientation, not with the code's
own transpose table. Loopback traffic only."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.gen.image_server import ImageServer
from udfs.download.download_worker import download_shard, make_key
from udfs.download.resize import ResizeConfig, process_image
from udfs.download.shard_writer import iter_samples, sample_json

# Upright picture: 300 x 200 (landscape), four quadrants of distinct colours.
W, H = 300, 200
COLOURS = {"top_left": (220, 20, 20), "top_right": (20, 200, 20), "bottom_left": (20, 20, 220),
           "bottom_right": (240, 240, 240)}


def upright_array() -> np.ndarray:
    a = np.zeros((H, W, 3), np.uint8)
    a[:H // 2, :W // 2] = COLOURS["top_left"]
    a[:H // 2, W // 2:] = COLOURS["top_right"]
    a[H // 2:, :W // 2] = COLOURS["bottom_left"]
    a[H // 2:, W // 2:] = COLOURS["bottom_right"]
    return a


# What a camera stores so that the viewer's operation (EXIF 2.3, tag 0x0112) shows the upright
# picture: stored = inverse(display operation)(upright). np.rot90(k=1) is counter-clockwise.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],                      # display: mirror horizontally
    3: lambda u: u[::-1, ::-1],                   # display: rotate 180
    4: lambda u: u[::-1, :],                      # display: mirror vertically
    5: lambda u: np.transpose(u, (1, 0, 2)),      # display: mirror horizontally, rotate 270 CW
    6: lambda u: np.rot90(u, 1),                  # display: rotate 90 CW
    7: lambda u: np.rot90(u, 2).transpose(1, 0, 2),  # display: mirror horizontally, rotate 90 CW
    8: lambda u: np.rot90(u, -1),                 # display: rotate 270 CW
}


def rotated_jpeg(orientation: int) -> bytes:
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright_array())))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def quadrant_colours(img: Image.Image) -> dict[str, tuple[int, ...]]:
    """Mean colour at the centre of each quadrant (away from edges and JPEG ringing)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = a.shape[:2]
    out = {}
    for name, (fy, fx) in {"top_left": (0.25, 0.25), "top_right": (0.25, 0.75),
                           "bottom_left": (0.75, 0.25), "bottom_right": (0.75, 0.75)}.items():
        y, x = int(fy * h), int(fx * w)
        patch = a[y - 5:y + 5, x - 5:x + 5].reshape(-1, 3).mean(axis=0)
        out[name] = tuple(int(round(v)) for v in patch)
    return out


def assert_upright(img: Image.Image) -> None:
    for name, got in quadrant_colours(img).items():
        want = COLOURS[name]
        assert max(abs(g - w) for g, w in zip(got, want)) < 30, (name, got, want)


def test_the_fixture_really_is_sideways():
    # Without the tag applied, orientation 6 shows a portrait picture whose corners are wrong.
    raw = Image.open(io.BytesIO(rotated_jpeg(6)))
    assert raw.size == (H, W) and raw.getexif()[0x0112] == 6
    with pytest.raises(AssertionError):
        assert_upright(raw)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["no", "keep_ratio", "border"])
def test_every_orientation_is_stored_upright(orientation, mode):
    out = process_image(rotated_jpeg(orientation), ResizeConfig(image_size=100, resize_mode=mode))
    img = Image.open(io.BytesIO(out.data))
    assert out.exif_orientation == orientation
    assert (out.original_width, out.original_height) == (W, H)   # the upright size
    assert not img.getexif().get(0x0112)                           # no tag left to apply twice
    if mode == "no":
        assert img.size == (W, H)
    elif mode == "keep_ratio":                                     # smaller (upright) side = 100
        assert img.size == (150, 100)
    else:                                                          # border: 150 x 100 on a 150 square
        assert img.size == (100, 100)
        img = img.crop((0, 17, 100, 83))
    assert_upright(img)


def test_image_without_exif_records_null():
    buf = io.BytesIO()
    Image.fromarray(upright_array()).save(buf, "JPEG")
    out = process_image(buf.getvalue(), ResizeConfig(image_size=100, resize_mode="no"))
    assert out.exif_orientation is None
    assert_upright(Image.open(io.BytesIO(out.data)))


def test_download_stores_a_rotated_phone_photo_upright(cfg, tmp_path):
    with ImageServer() as server:
        server.add("/phone.jpg", rotated_jpeg(6))
        server.add("/mirror.jpg", rotated_jpeg(7))
        server.add("/plain.jpg", rotated_jpeg(1))
        rows = [{"key": make_key(3, i, 4), "url": server.url(p), "text": f"photo {p}", "uid": f"{i:016x}"}
                for i, p in enumerate(("/phone.jpg", "/mirror.jpg", "/plain.jpg"))]
        section = cfg.section("download")
        section.update(allowed_cidrs="127.0.0.0/8", image_size=128, resize_mode="keep_ratio",
                       min_image_bytes=0, retries=0)
        download_shard(3, rows, section, str(tmp_path))
    meta = {m["url"].rsplit("/", 1)[-1]: m for m in pq.read_table(tmp_path / "00003.parquet").to_pylist()}
    assert {k: m["status"] for k, m in meta.items()} == dict.fromkeys(meta, "success")
    assert {k: m["exif_orientation"] for k, m in meta.items()} == {"phone.jpg": 6, "mirror.jpg": 7,
                                                                   "plain.jpg": 1}
    samples = {sample_json(s)["url"].rsplit("/", 1)[-1]: s for s in iter_samples(str(tmp_path / "00003.tar"))}
    for name, sample in samples.items():
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.size == (192, 128), name                         # landscape, as the photo was taken
        assert (meta[name]["width"], meta[name]["height"]) == img.size
        assert_upright(img)
        assert sample_json(sample)["exif_orientation"] == meta[name]["exif_orientation"]
