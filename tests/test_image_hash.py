"""pHash / dHash: imagehash's definition, stable under the edits it should survive, far apart for
different images, and never raising on bytes that do not decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.gen.image_server import encode
from tests.gen.photos import photo_like
from udfs.download import image_hash as ih


def _photo(seed: int, size=(320, 240)) -> Image.Image:
    return photo_like(seed, size)


def test_signed_unsigned_round_trip_and_hex():
    for u in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        s = ih.to_signed(u)
        assert -(1 << 63) <= s < (1 << 63)
        assert ih.to_unsigned(s) == u
    assert ih.to_hex(-1) == "f" * 16
    assert ih.to_hex(1) == "0" * 15 + "1"


def test_dct_rows_match_the_textbook_dct():
    # scipy's unnormalised DCT-II: y[k] = 2 * sum_n x[n] cos(pi k (2n + 1) / (2N))
    x = np.arange(32, dtype=float) ** 1.5
    y3 = 2 * sum(x[n] * np.cos(np.pi * 3 * (2 * n + 1) / 64) for n in range(32))
    assert ih._dct_rows(32, 8)[3] @ x == pytest.approx(y3)


def test_phash_is_the_textbook_definition_msb_first():
    """An independent, loop-by-loop DCT-II of a 32 x 32 array: bit i (from the top) is the 8x8
    block's i-th coefficient in row-major order, set when above the block's median."""
    x = np.random.default_rng(1).integers(0, 256, size=(32, 32)).astype(float)
    n = np.arange(32)
    coef = np.empty((8, 8))
    for u in range(8):
        for v in range(8):
            cu = np.cos(np.pi * u * (2 * n + 1) / 64)
            cv = np.cos(np.pi * v * (2 * n + 1) / 64)
            coef[u, v] = 4 * (cu[:, None] * cv[None, :] * x).sum()
    expected = int("".join("1" if c > np.median(coef) else "0" for c in coef.reshape(-1)), 2)
    assert ih.to_unsigned(ih.phash_pixels(x)) == expected


@pytest.mark.parametrize("pixels", ["noise", "flat", "halves", "stripes", "ramp"])
def test_phash_threshold_is_numpys_median_even_with_ties(pixels):
    """phash_pixels takes the median of the 64 coefficients without np.median (3x cheaper); the
    bits are the same as np.median's threshold, also where coefficients tie at the median."""
    x = {"noise": np.random.default_rng(2).integers(0, 256, size=(32, 32)).astype(float),
         "flat": np.full((32, 32), 128.0),
         "halves": np.repeat([[0.0] * 16 + [255.0] * 16], 32, axis=0),
         "stripes": np.tile([[0.0], [200.0]], (16, 32)),
         "ramp": np.add.outer(np.arange(32.0), np.arange(32.0))}[pixels]
    low = ih._DCT @ x @ ih._DCT.T
    expected = int("".join("1" if c > np.median(low) else "0" for c in low.reshape(-1)), 2)
    assert ih.to_unsigned(ih.phash_pixels(x)) == expected


def test_hamming_and_matrix_agree():
    rng = np.random.default_rng(0)
    a = rng.integers(-(1 << 63), (1 << 63) - 1, size=7, dtype=np.int64)
    b = rng.integers(-(1 << 63), (1 << 63) - 1, size=5, dtype=np.int64)
    m = ih.hamming_matrix(a, b)
    for i in range(7):
        for j in range(5):
            assert m[i, j] == bin(ih.to_unsigned(int(a[i])) ^ ih.to_unsigned(int(b[j]))).count("1")
    assert ih.hamming(5, 6) == 2
    assert ih.hamming(-1, 0) == 64


def test_copies_are_close_and_different_images_far():
    img = _photo(3)
    h = ih.phash(img)
    half = img.resize((160, 120), Image.Resampling.BILINEAR)
    jpeg30 = Image.open(io.BytesIO(encode(img, "JPEG", quality=30)))
    assert ih.hamming(h, ih.phash(half)) <= 4
    assert ih.hamming(h, ih.phash(jpeg30)) <= 4
    others = [ih.phash(_photo(s)) for s in range(10, 30)]
    assert min(ih.hamming(h, o) for o in others) > 10


def test_phash_bytes_decodes_and_tolerates_garbage():
    img = _photo(4, (640, 480))
    data = encode(img, "JPEG", quality=90)
    hb = ih.phash_bytes(data)
    assert isinstance(hb, int)
    # the 1/8-scale JPEG decode changes few bits against a full decode
    assert ih.hamming(hb, ih.phash(Image.open(io.BytesIO(data)).convert("RGB"))) <= 4
    assert ih.phash_bytes(encode(img, "PNG")) == ih.phash(img)   # PNG: lossless, no draft
    assert ih.phash_bytes(b"not an image") is None
    assert ih.phash_bytes(data[:200]) is None
    assert ih.phash_bytes(None) is None


def test_matches_imagehash_when_installed():
    imagehash = pytest.importorskip("imagehash")
    for seed in range(5):
        img = _photo(seed)
        assert ih.to_unsigned(ih.phash(img)) == int(str(imagehash.phash(img)), 16)
        assert ih.to_unsigned(ih.dhash(img)) == int(str(imagehash.dhash(img)), 16)
