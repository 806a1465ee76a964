"""A small deterministic caption/QA record generator for the model tests.

``scene_records`` stands in for ``cram_ray.data.pretrain_mix`` so these tests do not depend on the
data package: coloured shapes at grid positions, digits and words drawn on a plain background.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cram_ray.data.records import Record

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
WORDS = ("cat", "sun", "map", "box", "red", "hat")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def scene_records(n: int, image_size: int, seed: int) -> list[Record]:
    """``n`` deterministic caption/QA records on ``image_size`` square images."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=max(10, image_size // 3))
    out = []
    for i in range(n):
        img = Image.new("RGB", (image_size, image_size), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        kind = int(rng.integers(5))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        half = image_size // 2
        if kind in (0, 1, 2):  # one shape in a quadrant
            pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
            qx, qy = POSITIONS[pos]
            m = image_size // 10
            _shape(draw, shape, (qx * half + m, qy * half + m, qx * half + half - m, qy * half + half - m), COLOURS[colour])
            question, answer = [
                ("What colour is the shape?", colour),
                ("What shape is shown?", shape),
                ("Where is the shape?", pos),
            ][kind]
        elif kind == 3:  # count
            count = int(rng.integers(1, 5))
            cells = rng.permutation(4)[:count]
            for c in cells:
                qx, qy = int(c) % 2, int(c) // 2
                m = image_size // 8
                _shape(draw, shape, (qx * half + m, qy * half + m, qx * half + half - m, qy * half + half - m), COLOURS[colour])
            question, answer = "How many shapes are there?", str(count)
        else:  # text
            text = str(int(rng.integers(10))) if rng.random() < 0.5 else WORDS[int(rng.integers(len(WORDS)))]
            draw.text((image_size // 2, image_size // 2), text, fill=(0, 0, 0), font=font, anchor="mm")
            question, answer = "What is written?", text
        out.append(Record(f"s{seed}-{i}", "mix", _png(img), question, answer, "exact"))
    return out


def scene_vocabulary() -> list[str]:
    return (["What colour is the shape?", "What shape is shown?", "Where is the shape?",
             "How many shapes are there?", "What is written?", "Answer:"]
            + [f" {w}" for w in [*COLOURS, *SHAPES, *POSITIONS, *WORDS]] + [f" {d}" for d in range(10)])
