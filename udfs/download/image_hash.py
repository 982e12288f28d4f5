"""64-bit perceptual hashes of images (pHash, dHash) in plain numpy, no scipy.

pHash follows `imagehash.phash` (the hash LAION and COYO used for offline dedup): grey, resize to
32 x 32 (Lanczos), 2-D DCT-II, keep the 8 x 8 lowest frequencies, one bit per coefficient
= coefficient > their median. The first coefficient is the top bit, as in imagehash's hex string,
so `int(str(imagehash.phash(img)), 16) == phash(img)` (`bench/bench_image_dedup.py` measures the
agreement and the speed). The DCT is an 8 x 32 matrix product on each side: only the 64
coefficients that are used are computed.

`phash_bytes` is what `download` calls on the original bytes: JPEGs are decoded with libjpeg's DCT
scaling (`draft`) to at least 64 x 64 first, so hashing a 2000 px photo costs a 1/8-scale decode,
not a full one; the bench measures what that changes against a full decode.

Hashes are stored as signed 64-bit integers (Spark's LongType); `to_unsigned` / `to_signed` convert.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIZE = 32          # pHash works on a 32 x 32 grey image
_LOW = 8            # ... and keeps its 8 x 8 lowest DCT frequencies
DRAFT_SIZE = 64     # smallest size a JPEG is DCT-decoded to before the Lanczos resize


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the (unnormalised, scipy type-2) DCT matrix of size n."""
    i = np.arange(n)
    return 2.0 * np.cos(np.pi * np.outer(np.arange(k), 2 * i + 1) / (2 * n))


_DCT = _dct_rows(_SIZE, _LOW)


def to_signed(value: int) -> int:
    """An unsigned 64-bit hash as the signed integer Spark stores."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def to_hex(value: int) -> str:
    return f"{to_unsigned(int(value)):016x}"


def _bits_to_int(bits: np.ndarray) -> int:
    """64 booleans, the first the top bit, as the signed hash."""
    return to_signed(int.from_bytes(np.packbits(bits.reshape(-1)).tobytes(), "big"))


def phash_pixels(grey: np.ndarray) -> int:
    """pHash of a 32 x 32 grey image given as an array. The median of the 64 coefficients is the
    mean of the middle two, as np.median computes it (which costs ~3x more per call: download hashes
    every image)."""
    low = _DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T
    ranked = np.sort(low, axis=None)
    half = HASH_BITS // 2
    return _bits_to_int(low > (ranked[half - 1] + ranked[half]) / 2)


def phash(img: Image.Image) -> int:
    """Signed 64-bit pHash of a PIL image (any mode)."""
    grey = img.convert("L").resize((_SIZE, _SIZE), Image.Resampling.LANCZOS)
    return phash_pixels(np.asarray(grey))


def dhash(img: Image.Image) -> int:
    """Signed 64-bit difference hash (imagehash.dhash: 9 x 8 grey, left < right neighbour)."""
    grey = np.asarray(img.convert("L").resize((_LOW + 1, _LOW), Image.Resampling.LANCZOS), dtype=np.int16)
    return _bits_to_int(grey[:, 1:] > grey[:, :-1])


def open_for_hash(data: bytes) -> Image.Image:
    """Decode `data`, a JPEG at the smallest DCT scale that is still >= DRAFT_SIZE on both sides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("L", (DRAFT_SIZE, DRAFT_SIZE))
        img.load()
    return img


def phash_bytes(data: bytes | None) -> int | None:
    """pHash of encoded image bytes, None when they do not decode (never raises: a row whose
    hash is missing is simply left out of the near-duplicate layer)."""
    if not data:
        return None
    try:
        return phash(open_for_hash(data))
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None


# --- Hamming distances -----------------------------------------------------------------------------

def as_uint64(values) -> np.ndarray:
    """Signed or unsigned hashes (ints or an int64 array) as a uint64 array of the same bits."""
    if not isinstance(values, np.ndarray):   # Python ints: numpy may pick float64 or object for them
        return np.array([to_unsigned(int(v)) for v in values], dtype=np.uint64)
    if values.dtype == np.uint64:
        return values
    if values.dtype.kind in "iu":
        return values.astype(np.int64).view(np.uint64)
    return np.array([to_unsigned(int(v)) for v in values.reshape(-1)], dtype=np.uint64).reshape(values.shape)


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (byte lookup table: numpy<2 has no bitwise_count)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _POP8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int64)


def hamming(a: int, b: int) -> int:
    return (to_unsigned(int(a)) ^ to_unsigned(int(b))).bit_count()


def hamming_matrix(a, b) -> np.ndarray:
    """[len(a), len(b)] Hamming distances."""
    ua, ub = as_uint64(a).reshape(-1, 1), as_uint64(b).reshape(1, -1)
    return popcount(ua ^ ub)
