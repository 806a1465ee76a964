"""Manifest + LLaVA-JSON reader: good data reads exactly; each bad input fails with one naming line."""
from __future__ import annotations

import io

import pytest
from data_testutil import turn
from PIL import Image

from cram_ray.data.manifest import load_benchmark
from cram_ray.data.records import METRICS, DataError, TaskInfo


def test_good_benchmark_reads_every_record(bench):
    b = load_benchmark(bench.write())
    assert b.name == "toy" and b.path == bench.manifest_path.resolve()
    assert [t.name for t in b.tasks] == ["colour", "letter"]
    assert [t.metric for t in b.tasks] == ["lower_exact", "option_letter"]
    train = b.tasks[0].records("train")
    assert [r.id for r in train] == ["c1", "c2", "c3"]
    assert [r.instruction for r in train] == ["What colour?", "What colour?", "Say green."]
    assert [r.answer for r in train] == ["red", "blue", "green"]
    assert {r.task for r in train} == {"colour"} and {r.metric for r in train} == {"lower_exact"}
    # every image keeps its file's own bytes: a PNG stays PNG, a JPEG stays JPEG
    assert train[0].image == bench.images["a.png"]
    assert train[1].image == bench.images["b.jpg"]
    assert Image.open(io.BytesIO(train[1].image)).format == "JPEG"
    # no "image" key: a text-only record
    assert train[2].image is None
    # a numeric id is kept as its string
    assert b.tasks[1].records("train")[0].id == "7"
    assert len(b.tasks[0].records("test")) == 1


def test_task_info_and_lookup(bench):
    b = load_benchmark(bench.write())
    assert b.tasks[1].info(1) == TaskInfo(index=1, name="letter", metric="option_letter")
    assert b.task("letter") is b.tasks[1]
    with pytest.raises(KeyError, match="nope"):
        b.task("nope")


def test_instruction_without_image_marker_and_user_assistant_roles(bench):
    bench.json["json/letter_test.json"] = [{
        "id": "x", "image": "a.png",
        "conversations": [{"from": "user", "value": "  Pick. <image>\n"}, {"from": "assistant", "value": " B "}],
    }]
    rec = load_benchmark(bench.write()).tasks[1].records("test")[0]
    assert rec.instruction == "Pick." and rec.answer == "B"


def test_image_root_defaults_to_the_manifest_folder(bench):
    del bench.manifest["image_root"]
    path = bench.write()
    (path.parent / "a.png").write_bytes(bench.images["a.png"])
    (path.parent / "b.jpg").write_bytes(bench.images["b.jpg"])
    (path.parent / "c.png").write_bytes(bench.images["c.png"])
    assert len(load_benchmark(path).tasks[0].records("train")) == 3


def _fails(bench, *needles):
    path = bench.write()
    with pytest.raises(DataError) as info:
        load_benchmark(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_missing_image_file(bench):
    bench.json["json/colour_train.json"][1]["image"] = "gone.png"
    _fails(bench, "colour_train.json", "'c2'", "'image'", "gone.png", "not found")


def test_undecodable_image(bench):
    bench.images["b.jpg"] = b"\xff\xd8 this is not a jpeg"
    _fails(bench, "colour_train.json", "'c2'", "'image'", "b.jpg", "cannot decode")


def test_truncated_png(bench):
    bench.images["c.png"] = bench.images["c.png"][:40]
    _fails(bench, "colour_test.json", "'c4'", "'image'", "cannot decode")


def test_malformed_json_names_line_and_column(bench):
    bench.raw_json["json/letter_train.json"] = '[\n {"id": "l1",\n  "image": "a.png" "conversations": []}\n]'
    msg = _fails(bench, "letter_train.json", "malformed JSON", "line 3", "column")
    assert "column 20" in msg


def test_record_without_gpt_turn(bench):
    bench.json["json/colour_train.json"][0]["conversations"] = [{"from": "human", "value": "<image>\nWhat?"}]
    _fails(bench, "colour_train.json", "'c1'", "conversations", "no answer")


def test_record_with_empty_answer(bench):
    bench.json["json/colour_train.json"][2]["conversations"][1]["value"] = "   "
    _fails(bench, "colour_train.json", "'c3'", "conversations[1].value", "empty answer")


def test_record_without_id_is_named_by_index(bench):
    rows = bench.json["json/colour_train.json"]
    del rows[1]["id"]
    rows[1]["conversations"] = turn("What colour?", "")
    _fails(bench, "colour_train.json", "record #1", "empty answer")


def test_record_without_conversations(bench):
    del bench.json["json/letter_test.json"][0]["conversations"]
    _fails(bench, "letter_test.json", "'l2'", "'conversations'")


def test_unknown_metric_lists_the_valid_ones(bench):
    bench.manifest["tasks"][1]["metric"] = "bleu"
    _fails(bench, "bench.yaml", "'letter'", "'metric'", "'bleu'", ", ".join(METRICS))


def test_empty_split(bench):
    bench.json["json/letter_test.json"] = []
    _fails(bench, "letter_test.json", "no records")


def test_duplicate_task_name(bench):
    bench.manifest["tasks"][1]["name"] = "colour"
    _fails(bench, "bench.yaml", "tasks[1]", "duplicate task name", "'colour'")


def test_missing_json_file(bench):
    bench.manifest["tasks"][0]["test"] = "json/nowhere.json"
    _fails(bench, "bench.yaml", "'colour'", "'test'", "nowhere.json", "not found")


@pytest.mark.parametrize("key", ["name", "tasks"])
def test_manifest_missing_top_level_key(bench, key):
    del bench.manifest[key]
    _fails(bench, "bench.yaml", f"'{key}'", "missing")


@pytest.mark.parametrize("key", ["train", "metric"])
def test_manifest_task_missing_key(bench, key):
    del bench.manifest["tasks"][0][key]
    _fails(bench, "bench.yaml", "tasks[0]", "'colour'", f"'{key}'", "missing")


def test_manifest_not_yaml(bench):
    bench.write()
    bench.manifest_path.write_text("name: toy\ntasks: [a, b\n")
    with pytest.raises(DataError, match=r"bench\.yaml: not valid YAML at line \d+"):
        load_benchmark(bench.manifest_path)


def test_manifest_file_not_found(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.yaml: manifest file not found"):
        load_benchmark(tmp_path / "nothing.yaml")


def test_error_is_about_the_bad_record_only(bench):
    bench.json["json/colour_train.json"][2]["conversations"] = [{"from": "human", "value": "hi"}]
    msg = _fails(bench, "'c3'")
    assert "'c1'" not in msg and "'c2'" not in msg
    # fixing that one record brings every good record back
    bench.json["json/colour_train.json"][2]["conversations"] = turn("Say green.", "green")
    assert [r.id for r in load_benchmark(bench.write()).tasks[0].records("train")] == ["c1", "c2", "c3"]
