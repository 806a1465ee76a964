"""What the model is asked: records from a file (predict) or from an HTTP request (serve).

Files are LLaVA-style JSON (a list of ``{"id", "image", "conversations"}``, images relative to the
file's folder or an image root; the answer turn is optional) or a benchmark manifest (every task's
records of one split). A request is an image and a question; each problem is one line naming the
field, and an HTTP status (4xx) for the server to answer with.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cram_ray.data.manifest import IMAGE_MARKER, Limits, check_image, load_benchmark, load_image, read_entries
from cram_ray.data.records import DataError, Record

MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Question:
    """One record to answer, with what is known about its task (for routing by the true task id,
    and for scoring when the record carries a reference answer)."""

    record: Record
    known_task: bool  # record.task names a task of the stream and record.metric scores it


def read_questions(path: str | Path, *, image_root: Optional[str | Path] = None, task: Optional[str] = None,
                   metric: Optional[str] = None, split: str = "test", limits: Limits = Limits()) -> list[Question]:
    """The records of a LLaVA-style JSON file, or of one split of every task of a manifest.

    ``task`` / ``metric`` label every record of a JSON file (a manifest names its own)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: file not found")
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        bench = load_benchmark(path, check_images=False)
        return [Question(rec, True) for t in bench.tasks for rec in t.records(split)]
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for e in read_entries(path, root, limits, need_answer=False):
        image = None if e.image is None else load_image(e.image, limits, f"{path}: {e.label}")
        rec = Record(id=e.id, task=task or "", image=image, instruction=e.instruction, answer=e.answer,
                     metric=metric or "exact")
        out.append(Question(rec, task is not None and metric is not None))
    return out


# -- HTTP requests ---------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry (the image limits are the data code's, see data/manifest.py)."""

    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 40_000_000
    max_question_chars: int = 4_000

    @property
    def image(self) -> Limits:
        return Limits(max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes)


def _decoded_image(data: bytes, limits: RequestLimits) -> bytes:
    try:
        return check_image(data, limits.image, "request", "the image")
    except DataError as err:
        status = 413 if "limit max_image" in str(err) else 400
        raise RequestError(status, str(err)) from None


def _question(value: Any, limits: RequestLimits) -> str:
    if not isinstance(value, str):
        raise RequestError(400, f"request field 'question': expected text, got {type(value).__name__}")
    question = value.replace(IMAGE_MARKER, "").strip()  # as the manifest reader strips it
    if not question:
        raise RequestError(400, "request field 'question': empty (expected the question to answer)")
    if len(question) > limits.max_question_chars:
        raise RequestError(413, f"request field 'question': {len(question)} characters "
                                f"(limit max_question_chars={limits.max_question_chars})")
    return question


def _task(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value or None
    raise RequestError(400, f"request field 'task': expected a task name, got {type(value).__name__}")


def json_question(body: bytes, limits: RequestLimits) -> tuple[bytes, str, Optional[str]]:
    """(image bytes, question, task or None) of a JSON body ``{"image": base64, "question": text}``
    (``task`` optional; the image may be a ``data:image/...;base64,`` URL)."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "request body: not JSON (expected {\"image\": base64 PNG/JPEG, \"question\": text})") from None
    if not isinstance(raw, dict):
        raise RequestError(400, f"request body: expected a JSON object with 'image' and 'question', "
                                f"got {type(raw).__name__}")
    missing = [k for k in ("image", "question") if k not in raw]
    if missing:
        raise RequestError(400, f"request body: missing field(s) {', '.join(repr(k) for k in missing)} "
                                "(expected {\"image\": base64 PNG/JPEG, \"question\": text})")
    image = raw["image"]
    if not isinstance(image, str):
        raise RequestError(400, f"request field 'image': expected a base64 string, got {type(image).__name__}")
    if image.startswith("data:") and "," in image:
        image = image.split(",", 1)[1]
    if len(image) * 3 // 4 > limits.max_image_bytes + 3:  # before decoding: the encoded size bounds it
        raise RequestError(413, f"request field 'image': about {len(image) * 3 // 4} bytes "
                                f"(limit max_image_bytes={limits.max_image_bytes})")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "request field 'image': not valid base64 (expected a base64-encoded PNG/JPEG)") from None
    return _decoded_image(data, limits), _question(raw["question"], limits), _task(raw.get("task"))


def form_question(image: Optional[bytes], question: Any, task: Any,
                  limits: RequestLimits) -> tuple[bytes, str, Optional[str]]:
    """The same from a multipart form's fields (``image`` a file upload, ``question`` text)."""
    missing = [k for k, v in (("image", image), ("question", question)) if v is None]
    if missing:
        raise RequestError(400, f"request form: missing field(s) {', '.join(repr(k) for k in missing)} "
                                "(expected an 'image' file and a 'question')")
    return _decoded_image(image, limits), _question(question, limits), _task(task)
