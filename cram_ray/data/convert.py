"""Converters from the released CoIN and UCIT layouts to a cram_ray benchmark (manifest + LLaVA JSON).

Both benchmarks ship an instruction folder (one sub-folder per task with a train and a test JSON
file) beside an image folder every record's ``"image"`` is relative to. Train files are LLaVA
conversations; test files are "question" records ``{"question_id", "image", "text", "answer"}``
(CoIN's Grounding keeps its box in ``"answer_bbox"``), and some reference answers live in separate
annotation files: TextVQA's ten human answers per question, and the reference captions of UCIT's
captioning tasks. :func:`convert` maps all of it to one benchmark folder::

    <out>/<layout>.yaml             the manifest: tasks in the benchmark's order, the metric of each
    <out>/<Task>/train.json         LLaVA records {"id", "image", "conversations"}
    <out>/<Task>/test.json          the same, plus "answers" when the task has reference lists

The manifest's ``image_root`` points at the source image folder (a relative path), so images are
never copied. Nothing outside the source folder is read: every file, and every image path a record
names, is resolved (symlinks included) and must stay inside it. A record that cannot be mapped ends
the conversion with one line naming the file, the record and the field; nothing is left behind.
The folder sources, file names and metric choices are documented in docs/data.md.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from cram_ray.data.manifest import GPT_ROLES, HUMAN_ROLES, IMAGE_MARKER, Limits, read_json
from cram_ray.data.records import DataError
from cram_ray.eval.scorers import parse_box, parse_option_letter


@dataclass(frozen=True)
class References:
    """A file holding every reference answer of a task's test records.

    ``textvqa``: ``{"data": [{"question_id", "answers": [...]}, ...]}`` joined on the question id.
    ``coco_captions``: COCO caption annotations ``{"annotations": [{"image_id", "caption"}, ...]}``
    where image id ``k`` is the ``k``-th test record (1-based), as UCIT's caption scorer numbers its
    predictions.
    """

    kind: Literal["textvqa", "coco_captions"]
    files: tuple[str, ...]  # candidate paths, the first that exists is used
    under: Literal["task", "images"]  # relative to the task's instruction folder or to the image folder


@dataclass(frozen=True)
class TaskSpec:
    """One task of a released benchmark: where its files are and how it is scored."""

    name: str  # the task's name in the manifest
    folders: tuple[str, ...]  # candidate folder names under the instruction folder
    train: tuple[str, ...]  # candidate train file names
    test: tuple[str, ...]  # candidate test file names
    metric: str
    answer_fields: tuple[str, ...] = ("answer",)  # a test record's answer, first present field wins
    references: Optional[References] = None


@dataclass(frozen=True)
class Layout:
    """A released benchmark's folder layout, relative to the folder the user downloaded it into."""

    name: str
    title: str
    instructions: tuple[str, ...]  # candidate instruction folders
    images: tuple[str, ...]  # candidate image folders
    tasks: tuple[TaskSpec, ...]  # in stream order


COIN = Layout(
    name="coin", title="CoIN",
    instructions=("Instructions_Original", "Instruction_Original", "playground/Instructions_Original"),
    images=("cl_dataset", "datasets"),
    tasks=(
        TaskSpec("ScienceQA", ("ScienceQA",), ("train.json",), ("test.json",), "option_letter"),
        TaskSpec("TextVQA", ("TextVQA",), ("train.json",), ("val.json", "valid.json", "test.json"), "vqa",
                 references=References("textvqa", ("TextVQA/TextVQA_0.5.1_val.json",), "images")),
        TaskSpec("ImageNet", ("ImageNet",), ("train.json",), ("test.json",), "contains"),
        TaskSpec("GQA", ("GQA",), ("train.json",), ("test.json",), "lower_exact"),
        TaskSpec("VizWiz", ("VizWiz",), ("train.json",), ("val.json", "test.json"), "lower_exact"),
        TaskSpec("Grounding", ("Grounding",), ("train.json",), ("test.json",), "iou",
                 answer_fields=("answer_bbox", "answer")),
        TaskSpec("VQAv2", ("VQAv2",), ("train.json",), ("val.json", "test.json"), "lower_exact"),
        TaskSpec("OCRVQA", ("OCRVQA", "OCR-VQA"), ("train.json",), ("test.json",), "lower_exact"),
    ),
)

_CAPTION_REFS = References("coco_captions", ("val_coco_type_3000.json", "test_coco_type.json"), "task")
_UCIT_TEST = ("test_3000.json", "test.json")
UCIT = Layout(
    name="ucit", title="UCIT",
    instructions=("instructions", "."),
    images=("datasets",),
    tasks=(
        TaskSpec("ImageNet-R", ("ImageNet-R",), ("train.json",), _UCIT_TEST, "lower_exact"),
        TaskSpec("ArxivQA", ("ArxivQA",), ("train_4w.json", "train.json"), _UCIT_TEST, "lower_exact"),
        TaskSpec("VizWiz-Caption", ("VizWiz", "VizWiz-caption", "VizWiz-Caption"), ("train.json",), _UCIT_TEST,
                 "anls", references=_CAPTION_REFS),
        TaskSpec("IconQA", ("IconQA",), ("train.json",), _UCIT_TEST, "lower_exact"),
        TaskSpec("CLEVR-Math", ("CLEVR-Math", "CLEVR"), ("train_4w.json", "train.json"), _UCIT_TEST, "lower_exact"),
        TaskSpec("Flickr30k", ("Flickr30k", "Flickr30k-cap"), ("train_brief_4w.json", "train.json"), _UCIT_TEST,
                 "anls", references=_CAPTION_REFS),
    ),
)

LAYOUTS = {layout.name: layout for layout in (COIN, UCIT)}

# a test answer each metric's scorer must be able to read, checked now rather than at evaluation
_ANSWER_CHECKS: dict[str, tuple[Callable[[str], Any], str]] = {
    "option_letter": (parse_option_letter, "an option letter such as 'B'"),
    "iou": (parse_box, "a box '[x1, y1, x2, y2]'"),
}


@dataclass(frozen=True)
class TaskReport:
    """What one task's conversion did."""

    name: str
    metric: str
    train: int  # records written
    test: int
    skipped: int  # records dropped for a missing image (only with skip_missing_images)
    renamed: int  # records whose repeated id got a suffix
    with_references: int  # test records carrying a list of reference answers
    sources: dict[str, str] = field(default_factory=dict)  # what -> file used, relative to the source


@dataclass(frozen=True)
class Conversion:
    """A finished conversion: the manifest to give a stream, and what each task's conversion did."""

    manifest: Path
    tasks: list[TaskReport]
    reused: bool  # the output folder already held this very conversion


def convert(layout_name: str, src: str | Path, out: str | Path, *, instructions: Optional[str] = None,
            images: Optional[str] = None, skip_missing_images: bool = False,
            limits: Limits = Limits()) -> Conversion:
    """Convert the released benchmark under ``src`` into the benchmark folder ``out``.

    Args:
        layout_name: ``coin`` or ``ucit``.
        src: the folder the benchmark was downloaded into.
        out: the benchmark folder to write; it must not exist, or hold this same conversion already.
        instructions: the instruction folder relative to ``src`` (default: the layout's usual names).
        images: the image folder relative to ``src`` (default: the layout's usual names).
        skip_missing_images: drop (and count) records whose image file is absent instead of failing.
        limits: the size and nesting limits of JSON files.

    Raises:
        DataError: one line naming the file, record and field that cannot be mapped.
    """
    if layout_name not in LAYOUTS:
        raise DataError(f"--from: unknown layout {layout_name!r} (expected one of {', '.join(LAYOUTS)})")
    layout = LAYOUTS[layout_name]
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: source folder not found (expected the downloaded {layout.title} benchmark)")
    root = root.resolve()
    inst_dir = _pick_dir(root, (instructions,) if instructions else layout.instructions, "instruction", layout,
                         layout.tasks[0].folders[0])
    image_dir = _pick_dir(root, (images,) if images else layout.images, "image", layout, None)
    target = Path(out).expanduser().resolve()
    if target == root or root.is_relative_to(target):
        raise DataError(f"{target}: the output folder would hold the source {root}; choose another --out")
    work = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    new_parent = not target.parent.exists()
    reports: list[TaskReport] = []
    try:
        work.mkdir(parents=True)
        for spec in layout.tasks:
            reports.append(_convert_task(spec, layout, root, inst_dir, image_dir, work, skip_missing_images, limits))
        manifest = _write_manifest(layout, work, target, image_dir, reports)
        reused = _commit(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if new_parent and target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()  # a failed conversion leaves nothing behind, not even the folder
    return Conversion(manifest=target / manifest.name, tasks=reports, reused=reused)


# -- folders and files -------------------------------------------------------------------------
def _inside(path: Path, root: Path, what: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{path}: {what} resolves to {resolved}, outside the source folder {root}")
    return resolved


def _pick_dir(root: Path, candidates: tuple[str, ...], what: str, layout: Layout, holding: Optional[str]) -> Path:
    """The first candidate folder (that holds the sub-folder ``holding``, when given)."""
    for rel in candidates:
        path = root / rel
        if path.is_dir() and (holding is None or (path / holding).is_dir()):
            return _inside(path, root, f"the {what} folder")
    hint = f" holding {holding}/ and the other task folders" if holding else ""
    raise DataError(f"{root}: no {layout.title} {what} folder (looked for {', '.join(candidates)}{hint}; "
                    f"name it with --{what}s)")


def _pick_file(folder: Path, names: tuple[str, ...], root: Path, what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return _inside(folder / name, root, what)
    raise DataError(f"{folder}: no {what} file (expected one of {', '.join(names)})")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# -- one task ----------------------------------------------------------------------------------
def _convert_task(spec: TaskSpec, layout: Layout, root: Path, inst_dir: Path, image_dir: Path, work: Path,
                  skip_missing: bool, limits: Limits) -> TaskReport:
    folder = next((inst_dir / f for f in spec.folders if (inst_dir / f).is_dir()), None)
    if folder is None:
        raise DataError(f"{inst_dir}: no folder for {layout.title} task {spec.name!r} "
                        f"(expected one of {', '.join(spec.folders)})")
    folder = _inside(folder, root, f"task {spec.name!r}'s folder")
    files = {"train": _pick_file(folder, spec.train, root, "train"), "test": _pick_file(folder, spec.test, root, "test")}
    sources = {split: _rel(path, root) for split, path in files.items()}
    refs = None
    if spec.references is not None:
        base = folder if spec.references.under == "task" else image_dir
        ref_file = next((base / f for f in spec.references.files if (base / f).is_file()), None)
        if ref_file is not None:
            ref_file = _inside(ref_file, root, "the reference file")
            sources["references"] = _rel(ref_file, root)
            refs = _load_references(spec.references.kind, ref_file, limits)
    counts = {"skipped": 0, "renamed": 0, "with_references": 0}
    written = {}
    for split, path in files.items():
        raw = read_json(path, limits)
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{path}: expected a non-empty JSON list of records, got "
                            f"{type(raw).__name__ if raw else 'an empty list'}")
        records = []
        ids: set[str] = set()
        for i, rec in enumerate(raw):
            mapped = _map_record(rec, i, path, spec, split, image_dir, skip_missing)
            if mapped is None:
                counts["skipped"] += 1
                continue
            if split == "test" and refs is not None:
                answers = refs(rec, i, f"{path}: {_label(rec, i)}")
                mapped["answers"] = answers
                counts["with_references"] += 1
            mapped["id"], renamed = _unique(mapped["id"], ids)
            counts["renamed"] += renamed
            records.append(mapped)
        if not records:
            raise DataError(f"{path}: every record was skipped (no image found under {image_dir})")
        _write_records(work / spec.name / f"{split}.json", records)
        written[split] = len(records)
    return TaskReport(name=spec.name, metric=spec.metric, train=written["train"], test=written["test"],
                      sources=sources, **counts)


def _label(rec: Any, index: int) -> str:
    rid = rec.get("question_id", rec.get("id")) if isinstance(rec, dict) else None
    return f"record #{index}" if rid is None or isinstance(rid, (dict, list)) else f"record {str(rid)!r} (#{index})"


def _text(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text or None


def _first_pair(turns: Any, where: str) -> tuple[str, str]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where} field 'conversations': expected a non-empty list of "
                        "{'from': 'human'|'gpt', 'value': text} turns")
    question = None
    for j, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(role, str) or "value" not in turn:
            raise DataError(f"{where} field 'conversations[{j}]': expected {{'from': 'human'|'gpt', 'value': text}}, "
                            f"got {turn!r}"[:300])
        if question is None and role.lower() in HUMAN_ROLES:
            question = turn["value"]
        elif question is not None and role.lower() in GPT_ROLES:
            answer = _text(turn["value"])
            if answer is None:
                raise DataError(f"{where} field 'conversations[{j}].value': empty answer (expected non-empty text)")
            if not isinstance(question, str):
                raise DataError(f"{where} field 'conversations': the question is not text ({question!r})"[:300])
            return question, answer
    raise DataError(f"{where} field 'conversations': no human turn followed by a gpt turn")


def _map_record(rec: Any, index: int, path: Path, spec: TaskSpec, split: str, image_dir: Path,
                skip_missing: bool) -> Optional[dict[str, Any]]:
    """One released record as a LLaVA record, or None when its image is missing and may be skipped."""
    where = f"{path}: {_label(rec, index)}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rid = _text(rec.get("question_id", rec.get("id")))
    if rid is None:
        raise DataError(f"{where} field 'question_id': missing (expected the record's id in 'question_id' or 'id')")
    if "conversations" in rec:
        question, answer = _first_pair(rec["conversations"], where)
    elif "text" in rec:
        question = rec["text"]
        if not isinstance(question, str):
            raise DataError(f"{where} field 'text': expected the question text, got {question!r}"[:300])
        found = next((f for f in spec.answer_fields if f in rec), spec.answer_fields[-1])
        answer = _text(rec.get(found))
        if answer is None:
            raise DataError(f"{where} field '{found}': expected a non-empty answer, got {rec.get(found)!r}"[:300])
    else:
        raise DataError(f"{where}: expected 'conversations' (a LLaVA record) or 'text' with "
                        f"'{spec.answer_fields[0]}' (a question record)")
    if not question.replace(IMAGE_MARKER, "").strip():
        raise DataError(f"{where}: empty instruction (expected a question besides {IMAGE_MARKER})")
    if split == "test" and spec.metric in _ANSWER_CHECKS:
        parse, expected = _ANSWER_CHECKS[spec.metric]
        if parse(answer) is None:
            raise DataError(f"{where}: answer {answer!r} is not {expected} (metric {spec.metric})"[:300])
    out: dict[str, Any] = {"id": rid}
    image = rec.get("image")
    if image is not None:
        if not isinstance(image, str) or not image or os.path.isabs(image):
            raise DataError(f"{where} field 'image': expected a path relative to the image folder, got {image!r}"[:300])
        file = (image_dir / image).resolve()
        if not file.is_relative_to(image_dir):
            raise DataError(f"{where} field 'image': {image} resolves to {file}, outside the image folder {image_dir}")
        if not file.is_file():
            if skip_missing:
                return None
            raise DataError(f"{where} field 'image': image file {image_dir / image} not found "
                            "(--skip-missing-images drops such records)")
        out["image"] = image
        if IMAGE_MARKER not in question:
            question = f"{IMAGE_MARKER}\n{question}"
    out["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


def _unique(rid: str, seen: set[str]) -> tuple[str, int]:
    """``rid``, or ``rid-2``, ``rid-3``, ... when taken: LLaVA train files reuse an image's id for each
    of its questions, and the manifest needs one id per record."""
    new, k = rid, 1
    while new in seen:
        k += 1
        new = f"{rid}-{k}"
    seen.add(new)
    return new, int(new != rid)


def _load_references(kind: str, path: Path, limits: Limits) -> Callable[[dict, int, str], list[str]]:
    """A function giving a test record's reference answers (its dict, its position, how errors name it)."""
    raw = read_json(path, limits, "reference answers")
    refs: dict[Any, list[str]] = {}
    if kind == "textvqa":
        data = raw.get("data") if isinstance(raw, dict) else None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected {{'data': [{{'question_id', 'answers'}}, ...]}} (TextVQA annotations)")
        for j, item in enumerate(data):
            answers = item.get("answers") if isinstance(item, dict) else None
            if not isinstance(answers, list) or not answers or "question_id" not in item:
                raise DataError(f"{path}: data[{j}]: expected 'question_id' and a non-empty 'answers' list")
            refs[str(item["question_id"])] = [str(a) for a in answers]
    else:
        notes = raw.get("annotations") if isinstance(raw, dict) else None
        if not isinstance(notes, list):
            raise DataError(f"{path}: expected COCO caption annotations {{'annotations': [{{'image_id', 'caption'}}]}}")
        for j, item in enumerate(notes):
            caption = _text(item.get("caption")) if isinstance(item, dict) else None
            if caption is None or not isinstance(item.get("image_id"), int):
                raise DataError(f"{path}: annotations[{j}]: expected an integer 'image_id' and a non-empty 'caption'")
            refs.setdefault(item["image_id"], []).append(caption)

    def lookup(rec: dict, index: int, where: str) -> list[str]:
        key = str(rec.get("question_id")) if kind == "textvqa" else index + 1
        found = [a for a in (_text(a) for a in refs.get(key, [])) if a is not None]
        if not found:
            by = f"question_id {key}" if kind == "textvqa" else f"image_id {key} (the record's position)"
            raise DataError(f"{where}: no reference answers for {by} in {path}")
        return found

    return lookup


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


# -- the manifest and the commit ---------------------------------------------------------------
def _write_manifest(layout: Layout, work: Path, target: Path, image_dir: Path, reports: list[TaskReport]) -> Path:
    body = {
        "name": layout.name,
        # relative, so the benchmark folder and the source move together
        "image_root": os.path.relpath(image_dir, target),
        "tasks": [{"name": r.name, "train": f"{r.name}/train.json", "test": f"{r.name}/test.json", "metric": r.metric}
                  for r in reports],
    }
    header = (f"# {layout.title}, converted by `workflows/prepare_data.py --from {layout.name}`: the tasks in\n"
              "# the benchmark's order, each with the metric of its reference evaluation (docs/data.md,\n"
              "# 'CoIN and UCIT'). image_root is the released image folder; images are not copied.\n")
    path = work / f"{layout.name}.yaml"
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def _commit(work: Path, target: Path) -> bool:
    """Move the finished conversion into place; True when ``target`` already held the same files."""
    if target.exists():
        if target.is_dir() and _same_tree(work, target):
            return True
        raise DataError(f"{target}: exists and holds something other than this conversion; choose another --out")
    os.rename(work, target)
    return False
