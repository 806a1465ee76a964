"""Benchmark manifests: a YAML file naming the tasks of a stream, each with LLaVA-style JSON per split.

Layout (docs/DESIGN.md §5; the CoIN / UCIT / TriGap layout)::

    name: my-bench
    image_root: images/            # relative to the manifest (default: the manifest's folder)
    tasks:                         # in stream order
      - name: scienceqa
        train: instructions/scienceqa/train.json
        test: instructions/scienceqa/test.json
        metric: option_letter

Each JSON file is a list of records
``{"id": ..., "image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}``. The instruction is the first human turn with the ``<image>``
marker removed; the answer is the first gpt turn after it; a record without ``"image"`` is text-only.
Later turns of a multi-turn conversation are not used.

Everything is validated by :func:`load_benchmark`; each problem raises :class:`DataError` with one
line naming the file, the record (id or index) and the field, and what is expected.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from PIL import Image, UnidentifiedImageError

from cram_ray.data.records import METRICS, DataError, Record, TaskInfo

IMAGE_MARKER = "<image>"
SPLITS = ("train", "test")
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASK_KEYS = ("name", "train", "test", "metric")

Split = Literal["train", "test"]


@dataclass(frozen=True)
class _Entry:
    """One validated JSON record, image still on disk."""

    id: str
    image: Optional[Path]
    instruction: str
    answer: str


@dataclass(frozen=True)
class TaskData:
    """One task of a benchmark: where its splits live and how it is scored."""

    name: str
    metric: str
    train_path: Path
    test_path: Path
    image_root: Path

    def path(self, split: Split) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        return self.train_path if split == "train" else self.test_path

    def records(self, split: Split) -> list[Record]:
        """Every record of ``split``, images read from disk as PNG bytes (re-encoded if not PNG)."""
        path = self.path(split)
        return [
            Record(
                id=e.id,
                task=self.name,
                image=None if e.image is None else _png_bytes(e.image, path, e.id),
                instruction=e.instruction,
                answer=e.answer,
                metric=self.metric,
            )
            for e in _read_entries(path, self.image_root, check_images=False)
        ]

    def info(self, index: int) -> TaskInfo:
        """What a method is told about this task when it is the ``index``-th of the stream."""
        return TaskInfo(index=index, name=self.name, metric=self.metric)


@dataclass(frozen=True)
class Benchmark:
    """A stream of tasks, in order."""

    name: str
    path: Path  # the manifest file
    tasks: list[TaskData]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskData:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"benchmark {self.name!r} has no task {name!r} (tasks: {', '.join(self.task_names)})")


def load_benchmark(manifest_path: str | Path, *, check_images: bool = True) -> Benchmark:
    """Read and validate a manifest and every JSON file it names.

    Args:
        manifest_path: the manifest YAML.
        check_images: also decode every image once (catches corrupt files at load, costs a full
            pass over the images; turn off for very large data already known to be good).

    Raises:
        DataError: one line naming the file, record and field of the first problem found.
    """
    path = Path(manifest_path)
    raw = _read_manifest(path)
    where = str(path)
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: field 'name': expected a non-empty string, got {name!r}")
    image_root_raw = raw.get("image_root", ".")
    if not isinstance(image_root_raw, str):
        raise DataError(f"{where}: field 'image_root': expected a path relative to the manifest, got {image_root_raw!r}")
    image_root = (path.parent / image_root_raw).resolve()
    tasks_raw = raw["tasks"]
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise DataError(f"{where}: field 'tasks': expected a non-empty list of tasks, got {tasks_raw!r}")
    tasks: list[TaskData] = []
    seen: set[str] = set()
    for i, entry in enumerate(tasks_raw):
        task = _task_from_manifest(entry, i, path, image_root)
        if task.name in seen:
            raise DataError(f"{where}: tasks[{i}] field 'name': duplicate task name {task.name!r} (task names must be unique)")
        seen.add(task.name)
        tasks.append(task)
    for task in tasks:
        for split in SPLITS:
            _read_entries(task.path(split), image_root, check_images=check_images)
    return Benchmark(name=name.strip(), path=path.resolve(), tasks=tasks)


# -- the manifest ------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: manifest file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DataError(f"{path}: not valid YAML{at} ({problem})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (expected a YAML manifest)") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping with keys 'name', 'image_root', 'tasks', got {type(raw).__name__}")
    missing = [k for k in ("name", "tasks") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} "
                        "(expected 'name', 'image_root' and 'tasks')")
    return raw


def _task_from_manifest(entry: Any, i: int, path: Path, image_root: Path) -> TaskData:
    where = f"{path}: tasks[{i}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with keys {', '.join(TASK_KEYS)}, got {entry!r}")
    missing = [k for k in TASK_KEYS if k not in entry]
    if missing:
        label = f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else ""
        raise DataError(f"{where}{label}: missing key(s) {', '.join(repr(k) for k in missing)} "
                        f"(expected {', '.join(TASK_KEYS)})")
    name = entry["name"]
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise DataError(f"{where} field 'name': expected a non-empty string without '/', got {name!r}")
    where = f"{path}: task {name!r}"
    metric = entry["metric"]
    if metric not in METRICS:
        raise DataError(f"{where} field 'metric': unknown metric {metric!r} (valid: {', '.join(METRICS)})")
    splits = {}
    for split in SPLITS:
        rel = entry[split]
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where} field '{split}': expected a JSON path relative to the manifest, got {rel!r}")
        file = (path.parent / rel).resolve()
        if not file.is_file():
            raise DataError(f"{where} field '{split}': JSON file {file} not found")
        splits[split] = file
    return TaskData(name=name, metric=metric, train_path=splits["train"], test_path=splits["test"],
                    image_root=image_root)


# -- the JSON records --------------------------------------------------------------------------
def _read_entries(path: Path, image_root: Path, *, check_images: bool) -> list[_Entry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: JSON file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (expected a JSON list of records)") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: no records (expected a non-empty JSON list of records)")
    return [_entry(rec, i, path, image_root, check_images) for i, rec in enumerate(raw)]


def _entry(rec: Any, index: int, path: Path, image_root: Path, check_images: bool) -> _Entry:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: record #{index}: expected a JSON object with 'id' and 'conversations', "
                        f"got {type(rec).__name__}")
    rid = rec.get("id")
    if rid is None or isinstance(rid, (dict, list)) or str(rid) == "":
        rid = f"#{index}"
        label = f"record #{index}"
    else:
        rid = str(rid)
        label = f"record {rid!r} (#{index})"
    where = f"{path}: {label}"
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where} field 'conversations': expected a non-empty list of "
                        "{'from': 'human'|'gpt', 'value': text} turns")
    human = gpt = None
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or "value" not in turn:
            raise DataError(f"{where} field 'conversations[{j}]': expected {{'from': 'human'|'gpt', 'value': text}}, "
                            f"got {turn!r}")
        role = turn["from"].lower()
        if human is None and role in HUMAN_ROLES:
            human = j
        elif human is not None and role in GPT_ROLES:
            gpt = j
            break
    if human is None:
        raise DataError(f"{where} field 'conversations': no 'human' turn (expected the question first)")
    question = turns[human]["value"]
    if not isinstance(question, str):
        raise DataError(f"{where} field 'conversations[{human}].value': expected text, got {question!r}")
    if gpt is None:
        raise DataError(f"{where} field 'conversations': no answer (expected a 'gpt' turn after the 'human' turn)")
    answer = turns[gpt]["value"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
        raise DataError(f"{where} field 'conversations[{gpt}].value': empty answer (expected non-empty text)")
    image = None
    if rec.get("image") is not None:
        rel = rec["image"]
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where} field 'image': expected a path relative to image_root, got {rel!r}")
        image = image_root / rel
        if not image.is_file():
            raise DataError(f"{where} field 'image': image file {image} not found")
        if check_images:
            _decode(image.read_bytes(), image, path, label)
    instruction = question.replace(IMAGE_MARKER, "").strip()
    return _Entry(id=rid, image=image, instruction=instruction, answer=str(answer).strip())


def _decode(data: bytes, image: Path, path: Path, label: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: {label} field 'image': cannot decode {image} "
                        f"(expected a PNG/JPEG/... image file; {type(err).__name__})") from None
    return img


def _png_bytes(image: Path, path: Path, rid: str) -> bytes:
    """The file's bytes when it is a PNG, else the decoded image re-encoded as PNG."""
    try:
        data = image.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: record {rid!r} field 'image': image file {image} not found") from None
    if data.startswith(PNG_MAGIC):
        return data  # decodability was checked at load
    img = _decode(data, image, path, f"record {rid!r}")
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        img = img.convert("RGB")  # e.g. CMYK or YCbCr JPEGs, which PNG cannot store
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
