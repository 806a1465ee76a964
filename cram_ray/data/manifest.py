"""Benchmark manifests: a YAML file naming the tasks of a stream, each with LLaVA-style JSON per split.

Layout (docs/DESIGN.md §5; the CoIN / UCIT / TriGap layout)::

    name: my-bench
    image_root: images/            # relative to the manifest (default: the manifest's folder)
    allow_outside_root: false      # true: images and JSON files may resolve outside their roots
    limits: {max_image_pixels: 40000000}   # optional, see Limits
    tasks:                         # in stream order
      - name: scienceqa            # one safe path component: letters, digits, '.', '_', '-'
        train: instructions/scienceqa/train.json
        test: instructions/scienceqa/test.json
        metric: option_letter

Each JSON file is a list of records
``{"id": ..., "image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}``. The instruction is the first human turn with the ``<image>``
marker removed; the answer is the first gpt turn after it; a record without ``"image"`` is text-only.
Later turns of a multi-turn conversation are not used. An optional ``"answers"`` list holds every
reference answer a test record is scored against (VQA's human answers, a caption's references).

:func:`load_benchmark` validates the manifest and every record and holds only metadata (ids, resolved
image paths, instructions, answers); :func:`load_image` reads and checks one image. Each problem
raises :class:`DataError` with one line naming the file, the record (id or index) and the field.
"""
from __future__ import annotations

import difflib
import io
import json
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from PIL import Image, UnidentifiedImageError

from cram_ray.data.records import METRICS, DataError, Record, TaskInfo

IMAGE_MARKER = "<image>"
SPLITS = ("train", "test")
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
MANIFEST_KEYS = ("name", "image_root", "allow_outside_root", "limits", "tasks")
TASK_KEYS = ("name", "train", "test", "metric")
# a task name becomes a folder of the prepared data: one component, never '.', '..' or hidden
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# a JSON string (escapes included), then any bracket: depth is counted on what is left
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Limits:
    """What one benchmark file may be; checked before an image is decoded or a JSON file parsed."""

    max_image_pixels: int = 40_000_000  # width x height from the image header (PIL warns at 89M)
    max_image_bytes: int = 50_000_000  # an image file's size on disk
    max_json_bytes: int = 1_000_000_000  # a task JSON file's size on disk
    max_json_depth: int = 64  # nesting of lists/objects in a task JSON file (records need 4)


LIMIT_KEYS = tuple(f.name for f in fields(Limits))


@dataclass(frozen=True)
class Entry:
    """One validated JSON record: metadata only, the image still on disk (resolved path)."""

    id: str
    label: str  # how errors name it: "record 'id' (#i)"
    image: Optional[str]
    instruction: str
    answer: str
    answers: Optional[tuple[str, ...]] = None  # every reference answer, when the record lists them


@dataclass(frozen=True)
class TaskData:
    """One task of a benchmark: its validated records per split and how it is scored."""

    name: str
    metric: str
    train_path: Path
    test_path: Path
    image_root: Path
    limits: Limits
    splits: dict[str, list[Entry]]

    def path(self, split: Split) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        return self.train_path if split == "train" else self.test_path

    def entries(self, split: Split) -> list[Entry]:
        self.path(split)
        return self.splits[split]

    def records(self, split: Split) -> list[Record]:
        """Every record of ``split`` with its image's own bytes (small benchmarks and tests; the
        prepare job reads images batch by batch instead)."""
        path = self.path(split)
        return [Record(id=e.id, task=self.name, metric=self.metric, instruction=e.instruction, answer=e.answer,
                       image=None if e.image is None else load_image(e.image, self.limits, f"{path}: {e.label}"),
                       answers=e.answers)
                for e in self.splits[split]]

    def info(self, index: int) -> TaskInfo:
        """What a method is told about this task when it is the ``index``-th of the stream."""
        return TaskInfo(index=index, name=self.name, metric=self.metric)


@dataclass(frozen=True)
class Benchmark:
    """A stream of tasks, in order."""

    name: str
    path: Path  # the manifest file
    image_root: Path
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
        check_images: also read and decode every image once in this process (small benchmarks;
            the prepare job does this check in parallel instead).

    Raises:
        DataError: one line naming the file, record and field of the first problem found.
    """
    path = Path(manifest_path)
    raw = _read_manifest(path)
    where = str(path)
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: field 'name': expected a non-empty string, got {name!r}")
    outside = raw.get("allow_outside_root", False)
    if not isinstance(outside, bool):
        raise DataError(f"{where}: field 'allow_outside_root': expected true or false, got {outside!r}")
    limits = _limits(raw.get("limits", {}), where)
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
        task = _task_from_manifest(entry, i, path, image_root, limits, outside)
        if task.name in seen:
            raise DataError(f"{where}: tasks[{i}] field 'name': duplicate task name {task.name!r} (task names must be unique)")
        seen.add(task.name)
        tasks.append(task)
    if check_images:
        for task in tasks:
            for split in SPLITS:
                for e in task.entries(split):
                    if e.image is not None:
                        load_image(e.image, limits, f"{task.path(split)}: {e.label}")
    return Benchmark(name=name.strip(), path=path.resolve(), image_root=image_root, tasks=tasks)


def load_image(image: str | Path, limits: Limits, where: str) -> bytes:
    """The image file's own bytes, after checking its size, its header's pixel count (before any
    pixel is decoded) and that it decodes. ``where`` names the file and record in errors."""
    try:
        size = Path(image).stat().st_size
    except OSError:
        raise DataError(f"{where} field 'image': image file {image} not found") from None
    if size > limits.max_image_bytes:
        raise DataError(f"{where} field 'image': {image} has {size} bytes "
                        f"(limit max_image_bytes={limits.max_image_bytes})")
    return check_image(Path(image).read_bytes(), limits, where, str(image))


def check_image(data: bytes, limits: Limits, where: str, name: str) -> bytes:
    """``data`` if it is an encoded image within ``limits`` that decodes, else :class:`DataError`
    naming ``where`` (the file and record, or a request) and ``name`` (the image)."""
    if len(data) > limits.max_image_bytes:
        raise DataError(f"{where} field 'image': {name} has {len(data)} bytes "
                        f"(limit max_image_bytes={limits.max_image_bytes})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            img = Image.open(io.BytesIO(data))
        pixels = img.width * img.height
        if pixels > limits.max_image_pixels:
            raise DataError(f"{where} field 'image': {name} is {img.width}x{img.height} "
                            f"(limit max_image_pixels={limits.max_image_pixels})")
        img.load()
    except Image.DecompressionBombError:
        raise DataError(f"{where} field 'image': {name} has more pixels than PIL opens "
                        f"(limit max_image_pixels={limits.max_image_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{where} field 'image': cannot decode {name} "
                        f"(expected a PNG/JPEG/... image file; {type(err).__name__})") from None
    return data


# -- the manifest ------------------------------------------------------------------------------
def _unknown_keys(raw: dict, valid: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise DataError(f"{where}: unknown key {key!r} ({hint}valid keys: {', '.join(valid)})")


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
    except RecursionError:
        raise DataError(f"{path}: YAML nested too deeply (expected a flat manifest)") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping with keys 'name', 'image_root', 'tasks', got {type(raw).__name__}")
    _unknown_keys(raw, MANIFEST_KEYS, str(path))
    missing = [k for k in ("name", "tasks") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} "
                        "(expected 'name', 'image_root' and 'tasks')")
    return raw


def _limits(raw: Any, where: str) -> Limits:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: field 'limits': expected a mapping of {', '.join(LIMIT_KEYS)}, got {raw!r}")
    _unknown_keys(raw, LIMIT_KEYS, f"{where}: field 'limits'")
    for key, value in raw.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{where}: field 'limits.{key}': expected a positive integer, got {value!r}")
    return Limits(**raw)


def _resolve(base: Path, rel: str, where: str) -> Path:
    try:
        return (base / rel).resolve()
    except (OSError, ValueError, RuntimeError) as err:  # NUL bytes, symlink loops
        raise DataError(f"{where}: cannot resolve {rel!r} ({type(err).__name__})") from None


def _inside(target: Path, root: Path, outside_ok: bool) -> bool:
    return outside_ok or target == root or target.is_relative_to(root)


def _task_from_manifest(entry: Any, i: int, path: Path, image_root: Path, limits: Limits,
                        outside_ok: bool) -> TaskData:
    where = f"{path}: tasks[{i}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with keys {', '.join(TASK_KEYS)}, got {entry!r}")
    _unknown_keys(entry, TASK_KEYS, where)
    missing = [k for k in TASK_KEYS if k not in entry]
    if missing:
        label = f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else ""
        raise DataError(f"{where}{label}: missing key(s) {', '.join(repr(k) for k in missing)} "
                        f"(expected {', '.join(TASK_KEYS)})")
    name = entry["name"]
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise DataError(f"{where} field 'name': expected letters, digits, '.', '_' or '-' starting with a "
                        f"letter or digit (at most 100; it names a folder), got {name!r}")
    where = f"{path}: task {name!r}"
    metric = entry["metric"]
    if metric not in METRICS:
        raise DataError(f"{where} field 'metric': unknown metric {metric!r} (valid: {', '.join(METRICS)})")
    root = path.parent.resolve()
    files = {}
    for split in SPLITS:
        rel = entry[split]
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where} field '{split}': expected a JSON path relative to the manifest, got {rel!r}")
        file = _resolve(path.parent, rel, f"{where} field '{split}'")
        if not _inside(file, root, outside_ok):
            raise DataError(f"{where} field '{split}': {rel} resolves to {file}, outside the manifest's folder "
                            f"{root} (set allow_outside_root: true to allow)")
        if not file.is_file():
            raise DataError(f"{where} field '{split}': JSON file {file} not found")
        files[split] = file
    splits = {split: _read_entries(files[split], image_root, limits, outside_ok) for split in SPLITS}
    return TaskData(name=name, metric=metric, train_path=files["train"], test_path=files["test"],
                    image_root=image_root, limits=limits, splits=splits)


# -- the JSON records --------------------------------------------------------------------------
def _json_depth(text: str) -> int:
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_json(path: Path, limits: Limits, expected: str = "a JSON list of records") -> Any:
    """A JSON file's content, its size and nesting checked against ``limits`` before it is parsed;
    ``expected`` says in errors what the file should hold."""
    size = path.stat().st_size
    if size > limits.max_json_bytes:
        raise DataError(f"{path}: {size} bytes (limit max_json_bytes={limits.max_json_bytes})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (expected {expected})") from None
    depth = _json_depth(text)
    if depth > limits.max_json_depth:
        raise DataError(f"{path}: JSON nested {depth} deep (limit max_json_depth={limits.max_json_depth})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None


def read_entries(path: str | Path, image_root: str | Path, limits: Limits = Limits(), *, outside_ok: bool = False,
                 need_answer: bool = True) -> list[Entry]:
    """The validated records of one LLaVA-style JSON file, images resolved under ``image_root``;
    with ``need_answer=False`` a record may stop at its question (its answer is then "")."""
    return _read_entries(Path(path), Path(image_root).resolve(), limits, outside_ok, need_answer)


def _read_entries(path: Path, image_root: Path, limits: Limits, outside_ok: bool,
                  need_answer: bool = True) -> list[Entry]:
    raw = read_json(path, limits)
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: no records (expected a non-empty JSON list of records)")
    entries = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(raw):
        e = _entry(rec, i, path, image_root, outside_ok, need_answer)
        if e.id in seen:
            raise DataError(f"{path}: {e.label} field 'id': duplicate of record #{seen[e.id]} (ids must be unique)")
        seen[e.id] = i
        entries.append(e)
    return entries


def _entry(rec: Any, index: int, path: Path, image_root: Path, outside_ok: bool,
           need_answer: bool = True) -> Entry:
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
                            f"got {turn!r}"[:300])
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
        raise DataError(f"{where} field 'conversations[{human}].value': expected text, got {question!r}"[:300])
    instruction = question.replace(IMAGE_MARKER, "").strip()
    if not instruction:
        raise DataError(f"{where} field 'conversations[{human}].value': empty instruction "
                        f"(expected a question besides {IMAGE_MARKER})")
    if gpt is None and need_answer:
        raise DataError(f"{where} field 'conversations': no answer (expected a 'gpt' turn after the 'human' turn)")
    answer = "" if gpt is None else turns[gpt]["value"]
    if gpt is not None and (not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip()):
        raise DataError(f"{where} field 'conversations[{gpt}].value': empty answer (expected non-empty text)")
    image = None
    if rec.get("image") is not None:
        rel = rec["image"]
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where} field 'image': expected a path relative to image_root, got {rel!r}"[:300])
        file = _resolve(image_root, rel, f"{where} field 'image'")
        if not _inside(file, image_root, outside_ok):
            raise DataError(f"{where} field 'image': {rel} resolves to {file}, outside image_root {image_root} "
                            "(set allow_outside_root: true to allow)")
        if not file.is_file():
            raise DataError(f"{where} field 'image': image file {image_root / rel} not found")
        image = str(file)
    return Entry(id=rid, label=label, image=image, instruction=instruction, answer=str(answer).strip(),
                 answers=_answers(rec.get("answers"), where))


def _answers(raw: Any, where: str) -> Optional[tuple[str, ...]]:
    if raw is None:
        return None
    if (not isinstance(raw, list) or not raw
            or any(not isinstance(a, (str, int, float)) or isinstance(a, bool) or not str(a).strip() for a in raw)):
        raise DataError(f"{where} field 'answers': expected a non-empty list of non-empty answer strings, "
                        f"got {raw!r}"[:300])
    return tuple(str(a).strip() for a in raw)
