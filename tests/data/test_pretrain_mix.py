"""The base-pretraining mix: deterministic, covers the concepts, disjoint from the stream's tasks."""
from __future__ import annotations

import io
from collections import Counter

from PIL import Image

from cram_ray.data.builtin import TASKS, make_example
from cram_ray.data.pretrain_mix import pretrain_records, pretrain_vocabulary_texts

N = 400


def test_same_arguments_same_records_and_a_longer_mix_extends_a_shorter():
    a = pretrain_records(N, 64, seed=3)
    assert a == pretrain_records(N, 64, seed=3)
    assert pretrain_records(50, 64, seed=3) == a[:50]
    other = pretrain_records(50, 64, seed=4)
    assert sum(x.image != y.image for x, y in zip(a, other)) > 45


def test_records_are_well_formed():
    recs = pretrain_records(N, 48, seed=0)
    assert len(recs) == N and len({r.id for r in recs}) == N
    for r in recs:
        assert r.task == "pretrain" and r.metric == "exact" and r.answer.strip() and r.instruction.strip()
        img = Image.open(io.BytesIO(r.image))
        assert img.format == "PNG" and img.size == (48, 48)


def test_mix_covers_every_concept():
    answers = [r.answer for r in pretrain_records(N, 64, seed=0)]
    concepts = {
        "shape+position": lambda a: " at the " in a,
        "count": lambda a: a.split()[0] in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        "digit": lambda a: a.startswith(("the digit", "the number")),
        "word": lambda a: a.startswith("the word"),
        "letter": lambda a: a.startswith("the letter"),
        "bars": lambda a: "bar is" in a,
        "two shapes": lambda a: " and a " in a,
        "presence": lambda a: a in ("yes", "no"),
    }
    seen = Counter(name for a in answers for name, test in concepts.items() if test(a))
    assert set(seen) == set(concepts), seen


def test_disjoint_from_the_stream_tasks():
    mix = pretrain_records(N, 64, seed=0)
    stream_pairs, stream_images = set(), set()
    for name in TASKS:
        for i in range(60):
            for mode in ("distinct", "coin", "shared"):
                img, q, a = make_example(name, "train", i, 64, mode, 0)
                stream_pairs.add((q, a))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            stream_images.add(buf.getvalue())
    stream_questions = {q for q, _ in stream_pairs}
    assert not {(r.instruction, r.answer) for r in mix} & stream_pairs
    assert not {r.instruction for r in mix} & stream_questions
    assert not {r.image for r in mix} & stream_images


def test_vocabulary_covers_the_mix():
    vocab = set(pretrain_vocabulary_texts())
    for r in pretrain_records(N, 64, seed=7):
        assert r.instruction in vocab and r.answer in vocab and " " + r.answer in vocab
