"""The stage-0 base-pretraining mix: generic captions and short QA about the stream's visual concepts.

A real MLLM has seen objects, colours, counts, digits, text and layouts before it is tuned on a
stream; the tiny base must too, or its frozen vision tower cannot tell apart what the tasks ask
about (docs/DESIGN.md §6). So the mix covers each concept the built-in tasks use -- shapes, colours,
positions, counts, handwritten digits, letters and words, bar heights, presence -- in caption form
("a red triangle at the top left", "three blue dots", "the digit 7", "the word cat", "the tallest
bar is green") and as short QA. It stays disjoint from the stream: its own instructions and answer
formats, scikit-learn's 8x8 digits instead of MNIST, and plain random backgrounds instead of the
tasks' image styles.

Record ``i`` is drawn from ``numpy.random.default_rng([seed, MIX_KEY, i])`` alone: the same
``(n, image_size, seed)`` gives the same records, and a longer mix extends a shorter one.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from cram_ray.data.draw import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    draw_shape,
    glyph_image,
    pick,
    png_bytes,
    sklearn_digits,
    text_image,
)
from cram_ray.data.records import Record

MIX_VERSION = 2  # bump whenever the records change, so caches keyed on it are not reused
MIX_KEY = 0x5EED0  # separates the mix's random streams from the benchmark's
TASK, METRIC = "pretrain", "exact"

CAPTION_PROMPTS = ("Describe the image.", "Write a short caption for this picture.", "What does the picture show?")
POSITIONS = {  # 3x3 layout: name -> (column, row)
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
WORDS = (
    "cat", "dog", "sun", "map", "box", "hat", "cup", "pen", "bus", "key",
    "red", "sky", "top", "fox", "car", "tree", "fish", "book", "ship", "star", "moon", "bird", "lamp", "door",
)
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
BACKGROUNDS = ((255, 255, 255), (215, 215, 215), (235, 225, 200), (90, 90, 90), (0, 0, 0), (20, 30, 90),
               (200, 230, 210), (120, 70, 40), (60, 20, 70), (180, 200, 240))
COUNT_MAX = 9
TYPESET_DIGITS = 1 / 3  # share of digit records drawn in a font rather than by hand

Q_COLOUR = "Name the colour of the object."
Q_SHAPE = "Name the shape."
Q_WHERE = "Where is the object?"
Q_COLOUR_OF = "Tell me the colour of the {shape}."
Q_PRESENT = "Is there a {shape} in the picture?"
Q_COUNT = "Count the objects in the picture."
Q_DIGIT = "Read the digit."
Q_TEXT = "Read the text."
Q_SHORTEST = "Name the colour of the shortest bar."

Drawn = tuple[Image.Image, str, str]


def _contrast(a, b) -> float:
    return float(np.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))))


def _background(rng: np.random.Generator, *inks) -> tuple[int, int, int]:
    """A plain background far enough from every ink colour to keep the ink visible."""
    while True:
        bg = pick(rng, BACKGROUNDS)
        if all(_contrast(bg, ink) > 140 for ink in inks):
            return bg


def _cell_box(rng, size, col, row, scale) -> tuple[float, float, float, float]:
    cell = size / 3
    side = cell * scale
    cx = (col + 0.5) * cell + rng.uniform(-1, 1) * max(0.0, (cell - side) / 2)
    cy = (row + 0.5) * cell + rng.uniform(-1, 1) * max(0.0, (cell - side) / 2)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


# -- the kinds of record -----------------------------------------------------------------------
def _one_shape(rng, size) -> Drawn:
    colour, shape, where = pick(rng, list(COLOURS)), pick(rng, SHAPES), pick(rng, list(POSITIONS))
    img = Image.new("RGB", (size, size), _background(rng, COLOURS[colour]))
    col, row = POSITIONS[where]
    draw_shape(ImageDraw.Draw(img), shape, _cell_box(rng, size, col, row, rng.uniform(0.7, 1.0)), COLOURS[colour])
    question, answer = pick(rng, [
        (pick(rng, CAPTION_PROMPTS), f"a {colour} {shape} at the {where}"),
        (Q_COLOUR, colour), (Q_SHAPE, shape), (Q_WHERE, where),
    ])
    return img, question, answer


def _two_shapes(rng, size) -> Drawn:
    shapes = [SHAPES[int(k)] for k in rng.permutation(len(SHAPES))[:2]]
    colours = [list(COLOURS)[int(k)] for k in rng.permutation(len(COLOURS))[:2]]
    img = Image.new("RGB", (size, size), _background(rng, *(COLOURS[c] for c in colours)))
    draw = ImageDraw.Draw(img)
    rows = rng.integers(3, size=2)
    for col, shape, colour, row in zip((0, 2), shapes, colours, rows):
        draw_shape(draw, shape, _cell_box(rng, size, col, int(row), rng.uniform(0.75, 1.0)), COLOURS[colour])
    k = int(rng.integers(2))
    absent = next(s for s in SHAPES if s not in shapes)
    asked = pick(rng, [shapes[k], absent])
    question, answer = pick(rng, [
        (pick(rng, CAPTION_PROMPTS), f"a {colours[0]} {shapes[0]} and a {colours[1]} {shapes[1]}"),
        (Q_COLOUR_OF.format(shape=shapes[k]), colours[k]),
        (Q_PRESENT.format(shape=asked), "yes" if asked in shapes else "no"),
    ])
    return img, question, answer


def _many(rng, size) -> Drawn:
    n = int(rng.integers(1, COUNT_MAX + 1))
    colour = pick(rng, list(COLOURS))
    kind = pick(rng, ("dot", *SHAPES))
    img = Image.new("RGB", (size, size), _background(rng, COLOURS[colour]))
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(0.45, 0.7)
    for cell in rng.permutation(9)[:n]:
        box = _cell_box(rng, size, int(cell) % 3, int(cell) // 3, scale)
        draw_shape(draw, "circle" if kind == "dot" else kind, box, COLOURS[colour])
    noun = kind if n == 1 else kind + "s"
    question, answer = pick(rng, [
        (pick(rng, CAPTION_PROMPTS), f"{NUMBER_WORDS[n]} {colour} {noun}"),
        (Q_COUNT, str(n)),
    ])
    return img, question, answer


def _digit(rng, size) -> Drawn:
    """A handwritten scikit-learn digit, or (a third of the time) a typeset one."""
    images, labels = sklearn_digits()
    k = int(rng.integers(len(labels)))
    d = int(labels[k])
    ink = pick(rng, list(COLOURS) + ["black"])
    ink_rgb = COLOURS.get(ink, (0, 0, 0))
    bg = _background(rng, ink_rgb)
    offset = (int(rng.integers(-4, 5)), int(rng.integers(-4, 5)))
    if rng.random() < TYPESET_DIGITS:
        font_size = int(round(size * rng.uniform(0.45, 0.75)))
        img = text_image(str(d), size, font_name=pick(rng, FONTS), font_size=font_size, fg=ink_rgb, bg=bg,
                         offset=offset)
    else:
        img = glyph_image(images[k], size, rng.uniform(0.6, 0.85), fg=ink_rgb, bg=bg, offset=offset)
    question, answer = pick(rng, [
        (pick(rng, CAPTION_PROMPTS), f"the digit {d}"),
        (pick(rng, CAPTION_PROMPTS), f"the number {NUMBER_WORDS[d]}"),
        (Q_DIGIT, str(d)),
    ])
    return img, question, answer


def _text(rng, size, vocabulary: tuple[str, ...], noun: str) -> Drawn:
    text = pick(rng, vocabulary)
    ink = pick(rng, list(COLOURS) + ["black"])
    ink_rgb = COLOURS.get(ink, (0, 0, 0))
    font_size = int(round(size * rng.uniform(0.28, 0.5 if noun == "letter" else 0.36)))
    offset = (int(rng.integers(-5, 6)), int(rng.integers(-12, 13)))
    img = text_image(text, size, font_name=pick(rng, FONTS), font_size=font_size, fg=ink_rgb,
                     bg=_background(rng, ink_rgb), offset=offset)
    question, answer = pick(rng, [(pick(rng, CAPTION_PROMPTS), f"the {noun} {text}"), (Q_TEXT, text)])
    return img, question, answer


def _word(rng, size) -> Drawn:
    return _text(rng, size, WORDS, "word")


def _letter(rng, size) -> Drawn:
    return _text(rng, size, LETTERS, "letter")


def _bars(rng, size) -> Drawn:
    n = int(rng.integers(2, 6))
    colours = [list(COLOURS)[int(k)] for k in rng.permutation(len(COLOURS))[:n]]
    heights = rng.permutation(np.linspace(0.2, 0.9, 8))[:n]  # distinct heights, a clear order
    img = Image.new("RGB", (size, size), _background(rng, *(COLOURS[c] for c in colours)))
    draw = ImageDraw.Draw(img)
    slot = size * 0.9 / n
    horizontal = bool(rng.integers(2))
    for k, (colour, h) in enumerate(zip(colours, heights)):
        a, b = size * 0.05 + k * slot + slot * 0.15, size * 0.05 + (k + 1) * slot - slot * 0.15
        length = h * size * 0.9
        box = (size * 0.05, a, size * 0.05 + length, b) if horizontal else (a, size * 0.95 - length, b, size * 0.95)
        draw.rectangle(box, fill=COLOURS[colour])
    word = "longest" if horizontal else "tallest"
    question, answer = pick(rng, [
        (pick(rng, CAPTION_PROMPTS), f"the {word} bar is {colours[int(np.argmax(heights))]}"),
        (Q_SHORTEST, colours[int(np.argmin(heights))]),
    ])
    return img, question, answer


KINDS: tuple[tuple[Callable[[np.random.Generator, int], Drawn], float], ...] = (
    (_one_shape, 0.22), (_two_shapes, 0.14), (_many, 0.16), (_digit, 0.16),
    (_word, 0.12), (_letter, 0.06), (_bars, 0.14),
)
_WEIGHTS = np.array([w for _, w in KINDS]) / sum(w for _, w in KINDS)


def pretrain_record(i: int, image_size: int, seed: int) -> Record:
    """Record ``i`` of the mix (what :func:`pretrain_records` returns at position ``i``)."""
    rng = np.random.default_rng([seed, MIX_KEY, i])
    make = KINDS[int(rng.choice(len(KINDS), p=_WEIGHTS))][0]
    img, question, answer = make(rng, image_size)
    return Record(id=f"pretrain-{seed}-{i:06d}", task=TASK, image=png_bytes(img), instruction=question,
                  answer=answer, metric=METRIC)


def pretrain_records(n: int, image_size: int, seed: int) -> list[Record]:
    """``n`` caption / short-QA records on ``image_size`` square images (task "pretrain", metric "exact")."""
    if n < 0 or image_size < 16:
        raise ValueError(f"pretrain_records: expected n >= 0 and image_size >= 16, got {n}, {image_size}")
    return [pretrain_record(i, image_size, seed) for i in range(n)]


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    colours = list(COLOURS)
    nouns = ["dot", "dots"] + list(SHAPES) + [s + "s" for s in SHAPES]
    questions = {*CAPTION_PROMPTS, Q_COLOUR, Q_SHAPE, Q_WHERE, Q_COUNT, Q_DIGIT, Q_TEXT, Q_SHORTEST}
    questions.update(Q_COLOUR_OF.format(shape=s) for s in SHAPES)
    questions.update(Q_PRESENT.format(shape=s) for s in SHAPES)
    answers = {*colours, *SHAPES, *POSITIONS, *WORDS, *LETTERS, "yes", "no"}
    answers.update(str(n) for n in range(10))
    answers.update(f"a {c} {s} at the {p}" for c in colours for s in SHAPES for p in POSITIONS)
    answers.update(f"a {c} {s} and a {c2} {s2}" for c in colours for s in SHAPES for c2 in colours for s2 in SHAPES)
    answers.update(f"{w} {c} {noun}" for w in NUMBER_WORDS[1:COUNT_MAX + 1] for c in colours for noun in nouns)
    answers.update(f"the digit {d}" for d in range(10))
    answers.update(f"the number {w}" for w in NUMBER_WORDS[:10])
    answers.update(f"the word {w}" for w in WORDS)
    answers.update(f"the letter {x}" for x in LETTERS)
    answers.update(f"the {w} bar is {c}" for w in ("tallest", "longest") for c in colours)
    return tuple(sorted(questions | answers | {" " + a for a in answers}))


def pretrain_vocabulary_texts() -> list[str]:
    """Every instruction and answer the mix can emit (answers also with a leading space), for the tokenizer."""
    return list(_vocabulary())
