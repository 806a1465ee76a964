"""The built-in benchmark: deterministic bytes, configured sizes, truthful answers, one code path."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label

from cram_ray.config import BuiltinBenchmarkConfig, ConfigError
from cram_ray.data import builtin
from cram_ray.data.builtin import (
    COIN_VQA_INSTRUCTION, COIN_VQA_TASKS, SHARED_INSTRUCTION, TASKS, generate_builtin, make_example, vocabulary_texts,
)
from cram_ray.data.draw import COLOURS
from cram_ray.data.manifest import load_benchmark
from cram_ray.data.records import METRICS
from cram_ray.eval.scorers import score

SMALL = dict(train_per_task=8, test_per_task=5, image_size=64)
ALL = list(TASKS)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    manifest = generate_builtin(BuiltinBenchmarkConfig(**SMALL), out)
    return manifest, load_benchmark(manifest)


def test_default_task_order_is_the_registry():
    assert BuiltinBenchmarkConfig().tasks == ALL
    assert len(ALL) == 8 and all(TASKS[t].metric in METRICS for t in ALL)


def test_same_seed_same_bytes_different_seed_different(small, tmp_path):
    manifest, _ = small
    again = generate_builtin(BuiltinBenchmarkConfig(**SMALL), tmp_path / "a")
    first, second = _digests(manifest.parent), _digests(again.parent)
    assert first == second and len(first) == 8 * 13 + 8 * 2 + 2
    other = _digests(generate_builtin(BuiltinBenchmarkConfig(**SMALL, seed=1), tmp_path / "b").parent)
    images = [k for k in first if k.endswith(".png")]
    assert sum(first[k] != other[k] for k in images) > 0.8 * len(images)


def test_task_order_does_not_change_a_task_data(small, tmp_path):
    manifest, _ = small
    m = generate_builtin(BuiltinBenchmarkConfig(**SMALL, tasks=["count", "ocr"]), tmp_path)
    for rel in ("instructions/ocr/test.json", "images/count/train/00003.png"):
        assert (m.parent / rel).read_bytes() == (manifest.parent / rel).read_bytes()


def test_a_complete_copy_is_reused_not_regenerated(tmp_path):
    cfg = BuiltinBenchmarkConfig(**SMALL, tasks=["count"])
    m = generate_builtin(cfg, tmp_path)
    probe = m.parent / "images/count/train/00000.png"
    probe.write_bytes(b"sentinel")  # a regeneration would overwrite it
    assert generate_builtin(cfg, tmp_path) == m and probe.read_bytes() == b"sentinel"
    (m.parent / builtin.COMPLETE_MARKER).unlink()  # an incomplete copy is regenerated
    assert generate_builtin(cfg, tmp_path) == m and probe.read_bytes() != b"sentinel"
    assert [p.name for p in tmp_path.iterdir()] == [m.parent.name]  # no temporary folders left


def test_unknown_task_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'nope'.*choice"):
        generate_builtin(BuiltinBenchmarkConfig(tasks=["choice", "nope"]), tmp_path)


def test_generated_benchmark_loads_with_configured_sizes_and_metrics(small):
    _, bench = small
    assert [t.name for t in bench.tasks] == ALL
    for task in bench.tasks:
        assert task.metric == TASKS[task.name].metric
        for split, n in (("train", 8), ("test", 5)):
            recs = task.records(split)
            assert len(recs) == n and len({r.id for r in recs}) == n
            for r in recs:
                img = Image.open(io.BytesIO(r.image))
                assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
                assert r.answer.strip() and r.answer == r.answer.strip()
                assert r.answer in TASKS[task.name].answers
                assert r.instruction in TASKS[task.name].instructions
                assert r.task == task.name and r.metric == task.metric
                assert score(r.metric, r.answer, r.answer) == 1.0


def test_image_size_is_configurable(tmp_path):
    for name in ALL:
        img, _, _ = make_example(name, "train", 3, 32, "distinct", 0)
        assert img.size == (32, 32)


def test_shared_instruction_is_one_string_across_tasks(tmp_path):
    bench = load_benchmark(generate_builtin(BuiltinBenchmarkConfig(**SMALL, instructions="shared"), tmp_path))
    instructions = {r.instruction for t in bench.tasks for s in ("train", "test") for r in t.records(s)}
    assert instructions == {SHARED_INSTRUCTION}


def test_coin_instructions_share_the_vqa_one_among_the_vqa_tasks():
    per_task = {name: {make_example(name, "train", i, 32, "coin", 0)[1] for i in range(12)} for name in ALL}
    distinct = {name: {make_example(name, "train", i, 32, "distinct", 0)[1] for i in range(12)} for name in ALL}
    for name in ALL:
        if name in COIN_VQA_TASKS:
            assert per_task[name] == {COIN_VQA_INSTRUCTION}
        else:  # choice, unanswerable and ground keep their own, as ScienceQA, VizWiz and grounding in CoIN
            assert per_task[name] == distinct[name] and COIN_VQA_INSTRUCTION not in per_task[name]
    assert len(COIN_VQA_TASKS & set(ALL)) >= 2  # an overlap level 1 cannot split


def test_an_unknown_instruction_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="data.builtin.instructions"):
        make_example("ocr", "train", 0, 32, "mixed", 0)


def test_distinct_instructions_per_task_without_sharing(small):
    _, bench = small
    per_task = {t.name: {r.instruction for r in t.records("train")} for t in bench.tasks}
    for a in ALL:
        for b in ALL:
            if a != b:
                assert not per_task[a] & per_task[b]


def test_vocabulary_covers_every_instruction_and_answer():
    vocab = set(vocabulary_texts())
    assert SHARED_INSTRUCTION in vocab
    for name in ALL:
        for i in range(40):
            for mode in ("distinct", "coin", "shared"):
                _, q, a = make_example(name, "test", i, 64, mode, 5)
                assert q in vocab and a in vocab and " " + a in vocab


def test_answer_spaces_are_small_and_labels_balanced():
    for name, spec in TASKS.items():
        if name not in ("ground", "compose"):
            assert len(spec.answers) <= 12, name
        else:  # boxes on the 0-7 grid; colour-shape pairs
            assert len(spec.answers) <= 25, name
        answers = [make_example(name, "train", i, 64, "distinct", 0)[2] for i in range(60)]
        if name not in ("ground", "unanswerable"):
            counts = np.unique(answers, return_counts=True)[1]
            assert counts.max() - counts.min() <= 6, (name, counts)
    unans = [make_example("unanswerable", "train", i, 64, "distinct", 0)[2] for i in range(100)]
    assert unans.count("unanswerable") == 50


def test_mnist_train_and_test_images_never_coincide():
    train = {make_example("classify", "train", i, 64, "distinct", 0)[0].tobytes() for i in range(200)}
    test = {make_example("classify", "test", i, 64, "distinct", 0)[0].tobytes() for i in range(200)}
    assert not train & test


def test_tasks_can_be_told_apart_from_images_alone():
    """Nearest centroid on colour statistics alone routes held-out images to their task."""
    def features(img):
        x = np.asarray(img, dtype=np.float64) / 255.0
        return np.concatenate([x.mean((0, 1)), x.std((0, 1)), np.median(x.reshape(-1, 3), 0)])

    train = {n: np.stack([features(make_example(n, "train", i, 64, "distinct", 0)[0]) for i in range(30)]) for n in ALL}
    centroids = np.stack([train[n].mean(0) for n in ALL])
    hits = total = 0
    for k, n in enumerate(ALL):
        for i in range(30):
            f = features(make_example(n, "test", i, 64, "distinct", 0)[0])
            hits += int(np.argmin(((centroids - f) ** 2).sum(1)) == k)
            total += 1
    assert hits / total >= 0.95


# -- the answers are true of the pictures -----------------------------------------------------
def _mask(img, background, tol=40):
    x = np.asarray(img, dtype=np.int64)
    return np.abs(x - np.array(background)).sum(-1) > tol


def _colour_name(rgb):
    return min(COLOURS, key=lambda c: sum((int(a) - int(b)) ** 2 for a, b in zip(COLOURS[c], rgb)))


@pytest.mark.parametrize("i", range(12))
def test_count_answer_is_the_number_of_dots(i):
    img, _, answer = make_example("count", "test", i, 64, "distinct", 0)
    assert label(_mask(img, builtin.COUNT_FELT), connectivity=1).max() == int(answer)


@pytest.mark.parametrize("i", range(12))
def test_ground_answer_is_the_object_box(i):
    img, q, answer = make_example("ground", "test", i, 64, "distinct", 0)
    x = np.asarray(img, dtype=np.int64)
    paper = np.array(builtin.GROUND_PAPER)
    lines = np.array(builtin.GROUND_LINES)
    ink = (np.abs(x - paper).sum(-1) > 40) & (np.abs(x - lines).sum(-1) > 40)
    ys, xs = np.nonzero(ink)
    edges = [round(k * 64 / builtin.GROUND_CELLS) for k in range(builtin.GROUND_CELLS + 1)]

    def cell(v):
        return int(np.searchsorted(edges, v, side="right")) - 1

    box = [cell(xs.min()), cell(ys.min()), cell(xs.max()), cell(ys.max())]
    assert answer == f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"
    colour = _colour_name(x[ys[len(ys) // 2], xs[len(xs) // 2]])
    assert f" {colour} " in q


@pytest.mark.parametrize("i", range(8))
def test_choice_answer_is_the_panel_with_the_shape(i):
    img, _, answer = make_example("choice", "test", i, 64, "distinct", 0)
    ink = _mask(img, builtin.CHOICE_PANEL) & _mask(img, builtin.CHOICE_BG)
    ys, xs = np.nonzero(ink)
    panel = int(ys.mean() >= 32) * 2 + int(xs.mean() >= 32)
    assert answer == "ABCD"[panel]


@pytest.mark.parametrize("i", range(10))
def test_chart_answer_is_the_colour_of_the_tallest_bar(i):
    img, _, answer = make_example("chart", "test", i, 64, "distinct", 0)
    x = np.asarray(img, dtype=np.int64)
    coloured = (x.max(-1) - x.min(-1)) > 60  # bars are saturated; paper and axes are grey
    rows = np.nonzero(coloured.any(1))[0]
    top = rows.min()
    assert _colour_name(x[top, np.nonzero(coloured[top])[0][0]]) == answer
    # the lead is visible: the second-tallest bar starts several rows lower
    others = coloured.copy()
    others[:, np.nonzero(coloured[top + 1])[0]] = False
    assert np.nonzero(others.any(1))[0].min() - top >= 4


@pytest.mark.parametrize("i", range(10))
def test_unanswerable_answers_the_circle_colour_or_unanswerable(i):
    img, _, answer = make_example("unanswerable", "test", i, 64, "distinct", 0)
    ink = _mask(img, builtin.UNANSWERABLE_BG)
    ys, xs = np.nonzero(ink)
    fill = ink.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    is_circle = 0.7 < fill < 0.85  # pi/4 of its box; a square fills ~1, a triangle ~0.5
    colour = _colour_name(np.asarray(img)[int(ys.mean()) + 2, int(xs.mean())])
    assert answer == (colour if is_circle else "unanswerable")


@pytest.mark.parametrize("mode", ["distinct", "coin", "shared"])
def test_compose_answer_is_the_colour_and_shape_of_the_object(mode):
    seen = set()
    for i in range(18):
        img, _, answer = make_example("compose", "test", i, 64, mode, 0)
        ink = _mask(img, builtin.COMPOSE_BG)
        assert label(ink, connectivity=1).max() == 1
        ys, xs = np.nonzero(ink)
        fill = len(ys) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        shape = "triangle" if fill < 0.65 else ("circle" if fill < 0.88 else "square")
        colour = _colour_name(np.asarray(img)[int(np.median(ys)), int(np.median(xs))])
        assert answer == f"{colour} {shape}"
        seen.add(answer)
    assert len(seen) == 18  # the first 18 records cover every colour-shape pair once


def test_ocr_and_classify_answers_follow_their_label_cycle():
    assert [make_example("ocr", "train", i, 64, "distinct", 0)[2] for i in range(10)] == list(builtin.OCR_WORDS)
    names = [make_example("classify", "test", i, 64, "distinct", 0)[2] for i in range(10)]
    assert names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_manifest_layout_is_the_user_layout(small):
    manifest, _ = small
    rows = json.loads((manifest.parent / "instructions/chart/train.json").read_text())
    assert rows[0]["image"] == "chart/train/00000.png"
    assert rows[0]["conversations"][0]["value"].startswith("<image>\n")
    assert rows[0]["conversations"][1]["from"] == "gpt"
