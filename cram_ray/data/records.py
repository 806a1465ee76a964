"""The record every task is made of, and the error bad data raises.

A record is one (image, instruction, answer) example of one task, scored by one metric. On disk it
is a row of a parquet shard with the columns of :data:`SCHEMA_FIELDS` (and, when its benchmark has
them, :data:`OPTIONAL_FIELDS`); in memory a :class:`Record`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

METRICS = ("exact", "lower_exact", "option_letter", "vqa", "contains", "iou", "iou_grid", "anls")
SCHEMA_FIELDS = ("id", "task", "image", "instruction", "answer", "metric")
# shards written before a field existed lack its column: it reads as None
OPTIONAL_FIELDS = ("answers",)


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a name taken from user data
    can neither break an error line in two nor send terminal escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class DataError(ValueError):
    """Bad input data; the message is one line naming the file, record and field."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


@dataclass(frozen=True)
class Record:
    """One example. ``image`` holds the image file's own encoded bytes (PNG, JPEG, ...; None: a
    text-only example): preparing data never re-encodes an image."""

    id: str
    task: str
    image: Optional[bytes]
    instruction: str
    answer: str
    metric: str
    # every reference answer when the data set has several (VQA's ten human answers, a caption's
    # references); ``answer`` stays the one the model is trained on
    answers: Optional[tuple[str, ...]] = None

    @property
    def reference(self) -> str | list[str]:
        """What a prediction is scored against (``cram_ray.eval.scorers.score``): the list of
        reference answers when there is one, else the answer."""
        return list(self.answers) if self.answers else self.answer

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["answers"] = None if self.answers is None else list(self.answers)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Record":
        answers = row.get("answers")
        return cls(**{k: row[k] for k in SCHEMA_FIELDS}, answers=tuple(answers) if answers else None)


@dataclass(frozen=True)
class TaskInfo:
    """What a method is told about the task it is learning (never the test labels)."""

    index: int  # position in the stream, 0-based
    name: str
    metric: str
