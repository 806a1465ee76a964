"""Request and file inputs: every malformed request is one 4xx line; JSON files need no answers."""
import json

import pytest
from conftest import b64, png

from cram_ray.data.records import DataError
from cram_ray.serving.inputs import RequestError, RequestLimits, form_question, json_question, read_questions

LIMITS = RequestLimits(max_image_bytes=4000, max_image_pixels=400, max_question_chars=50)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_valid_request_gives_the_image_bytes_and_the_question_without_the_image_marker():
    image = png()
    got = json_question(body(image=b64(image), question="<image>\nWhat colour? "), LIMITS)
    assert got == (image, "What colour?", None)
    data_url = json_question(body(image="data:image/png;base64," + b64(image), question="q", task="count"), LIMITS)
    assert data_url == (image, "q", "count")


@pytest.mark.parametrize("raw, status, words", [
    (b"{not json", 400, ["not JSON"]),
    (b"[1, 2]", 400, ["JSON object", "list"]),
    (body(question="q"), 400, ["missing", "'image'"]),
    (body(image=b64(png())), 400, ["missing", "'question'"]),
    (body(image=b64(png()), question="  <image> "), 400, ["'question'", "empty"]),
    (body(image=b64(png()), question="x" * 51), 413, ["max_question_chars=50"]),
    (body(image="@@not base64@@", question="q"), 400, ["base64"]),
    (body(image=b64(b"GIF89a but not really"), question="q"), 400, ["cannot decode"]),
    (body(image=b64(png(30, 30)), question="q"), 413, ["30x30", "max_image_pixels=400"]),
    (body(image=b64(b"x" * 6000), question="q"), 413, ["max_image_bytes=4000"]),
    (body(image=7, question="q"), 400, ["'image'", "base64 string"]),
    (body(image=b64(png()), question="q", task=3), 400, ["'task'"]),
])
def test_a_malformed_request_is_refused_with_a_4xx_and_one_line_naming_the_field(raw, status, words):
    with pytest.raises(RequestError) as err:
        json_question(raw, LIMITS)
    assert err.value.status == status
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_form_upload_is_checked_like_a_json_body():
    assert form_question(png(), "What?", None, LIMITS) == (png(), "What?", None)
    with pytest.raises(RequestError) as err:
        form_question(None, "What?", None, LIMITS)
    assert err.value.status == 400 and "'image'" in str(err.value)
    with pytest.raises(RequestError) as err:
        form_question(png(), "", None, LIMITS)
    assert err.value.status == 400 and "'question'" in str(err.value)


def _llava(tmp_path, records):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    path = tmp_path / "q.json"
    path.write_text(json.dumps(records))
    return path


def test_a_llava_json_file_needs_no_answers_and_resolves_images_next_to_it(tmp_path):
    path = _llava(tmp_path, [
        {"id": "a", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
    ])
    qs = read_questions(path)
    assert [q.record.id for q in qs] == ["a", "b"]
    assert qs[0].record.image == png() and qs[0].record.instruction == "What colour?" and qs[0].record.answer == ""
    assert qs[1].record.image is None and qs[1].record.answer == "hi"
    assert not any(q.known_task for q in qs)
    labelled = read_questions(path, task="compose", metric="lower_exact")
    assert all(q.known_task and q.record.task == "compose" and q.record.metric == "lower_exact" for q in labelled)


def test_a_bad_llava_json_record_names_the_file_record_and_field(tmp_path):
    path = _llava(tmp_path, [{"id": "a", "image": "img/missing.png",
                              "conversations": [{"from": "human", "value": "<image>\nq"}]}])
    with pytest.raises(DataError) as err:
        read_questions(path)
    assert "q.json" in str(err.value) and "'a'" in str(err.value) and "'image'" in str(err.value)
