"""Synthetic shape images and their captions in English, German and French (contract 7).

The test domain of the tiny CLIP model: one shape (circle, square, triangle, star) in one colour
(red, green, blue, yellow) on a plain or noisy background. Drawn with PIL's ImageDraw, on purpose
independently of the numpy renderer in `tests/fixtures/tiny_clip/train_tiny_clip.py`, so a test
that scores these images checks that the model learned the domain, not its own drawing code.

Captions respect grammatical gender: German "ein roter Kreis" / "ein rotes Quadrat", French
"un cercle rouge" / "une étoile rouge"; a few phrasing variants per language (`variant=`).
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
LANGS = ("en", "de", "fr")

RGB = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}

# German: adjective stem + noun gender (m/n) drives the ending: ein roter Kreis, ein rotes Quadrat.
_DE_COLOR = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb"}
_DE_NOUN = {"circle": ("Kreis", "m", "Kreises"), "square": ("Quadrat", "n", "Quadrats"),
            "triangle": ("Dreieck", "n", "Dreiecks"), "star": ("Stern", "m", "Sterns")}
# French: noun gender drives article and adjective; the colour adjective follows the noun.
_FR_COLOR = {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
             "yellow": ("jaune", "jaune")}
_FR_NOUN = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
            "star": ("étoile", "f")}

N_VARIANTS = 3


def caption(color: str, shape: str, lang: str = "en", variant: int = 0) -> str:
    """A caption of `color` `shape` in `lang` ("en", "de", "fr"); `variant` picks the phrasing
    (0: "a red circle" style, 1: "a photo of ...", 2: "... on a background"/article-less)."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {color!r}/{shape!r}")
    v = variant % N_VARIANTS
    if lang == "en":
        return (f"a {color} {shape}", f"a photo of a {color} {shape}",
                f"a {color} {shape} on a background")[v]
    if lang == "de":
        noun, gender, genitive = _DE_NOUN[shape]
        stem = _DE_COLOR[color]
        nominative = stem + ("er" if gender == "m" else "es")
        if v == 0:
            return f"ein {nominative} {noun}"
        if v == 1:
            return f"ein Foto eines {stem}en {genitive}"
        return f"{nominative} {noun} auf einem Hintergrund"
    if lang == "fr":
        noun, gender = _FR_NOUN[shape]
        adj = _FR_COLOR[color][0 if gender == "m" else 1]
        article = "un" if gender == "m" else "une"
        if v == 0:
            return f"{article} {noun} {adj}"
        if v == 1:
            return f"une photo d'{article} {noun} {adj}"
        return f"{article} {noun} {adj} sur un fond"
    raise ValueError(f"unknown language {lang!r}; choose one of {LANGS}")


def _star_points(cx: float, cy: float, r_out: float, r_in: float, angle: float) -> list[tuple]:
    pts = []
    for i in range(10):
        r = r_out if i % 2 == 0 else r_in
        a = angle + i * math.pi / 5 - math.pi / 2
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_shape(color: str, shape: str, size: int = 64, background: str = "plain",
               rng: random.Random | None = None) -> Image.Image:
    """An RGB image of `size` x `size` pixels with one `shape` in `color`.

    `background` is "plain" (white) or "noisy" (light grey pixel noise). `rng` (random.Random or a
    numpy Generator) jitters position, size and rotation; None draws the shape centred and upright.
    """
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {color!r}/{shape!r}")
    if background not in ("plain", "noisy"):
        raise ValueError(f"background must be 'plain' or 'noisy', got {background!r}")
    if size < 16:
        raise ValueError("size must be at least 16 pixels")
    if background == "plain":
        img = Image.new("RGB", (size, size), (255, 255, 255))
    else:
        noise_rng = rng or random.Random(0)
        raw = (noise_rng.randbytes(size * size) if hasattr(noise_rng, "randbytes")
               else noise_rng.bytes(size * size))  # numpy Generator
        grey = bytes(150 + (b * 106 >> 8) for b in raw)
        img = Image.frombytes("L", (size, size), grey).convert("RGB")
    draw = ImageDraw.Draw(img)
    if rng is None:
        scale, dx, dy, angle = 0.35, 0.0, 0.0, 0.0
    else:
        scale = rng.uniform(0.25, 0.4)
        dx, dy = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08)
        angle = rng.uniform(-0.3, 0.3)
    r = scale * size
    cx, cy = size / 2 + dx * size, size / 2 + dy * size
    fill = RGB[color]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2),
                cy + r * math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2)) for k in range(3)]
        draw.polygon(pts, fill=fill)
    else:
        draw.polygon(_star_points(cx, cy, r, r * 0.45, angle), fill=fill)
    return img


def all_classes() -> list[tuple[str, str]]:
    """The 16 (colour, shape) classes in a fixed order."""
    return [(c, s) for c in COLORS for s in SHAPES]
