"""The record every task is made of, and the error bad data raises.

A record is one (image, instruction, answer) example of one task, scored by one metric. On disk it
is a row of a parquet shard with the columns of :data:`SCHEMA_FIELDS`; in memory a :class:`Record`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

METRICS = ("exact", "lower_exact", "option_letter", "vqa", "contains", "iou", "iou_grid", "anls")
SCHEMA_FIELDS = ("id", "task", "image", "instruction", "answer", "metric")


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

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Record":
        return cls(**{k: row[k] for k in SCHEMA_FIELDS})


@dataclass(frozen=True)
class TaskInfo:
    """What a method is told about the task it is learning (never the test labels)."""

    index: int  # position in the stream, 0-based
    name: str
    metric: str
