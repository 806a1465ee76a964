"""Markdown tables for reports: rows of results, and the accuracy matrix."""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Sequence

from cram_ray.eval.metrics import lower_triangle

MISSING = "-"


def format_cell(value: Any, floatfmt: str = ".1f") -> str:
    """One cell: floats with ``floatfmt``, ``(mean, std)`` as "mean ± std", None/NaN as "-"."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return MISSING if math.isnan(value) else format(value, floatfmt)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2:
        mean, std = value
        if std is None:
            return format_cell(mean, floatfmt)
        return f"{format_cell(mean, floatfmt)} ± {format_cell(std, floatfmt)}"
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return format_cell(value.item(), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = ".1f",
                   headers: Optional[Mapping[str, str]] = None) -> str:
    """A GitHub-flavoured markdown table of ``rows`` restricted to ``columns``, in that order.

    Missing keys show as "-". Columns whose present values are all numbers are right-aligned.
    ``headers`` renames columns in the header row (default: the column keys).
    """
    if not columns:
        raise ValueError("markdown_table: expected at least one column")
    cells = [[format_cell(r.get(c), floatfmt) for c in columns] for r in rows]
    header = [format_cell((headers or {}).get(c, c)) for c in columns]

    def numeric(c: str) -> bool:
        vals = [r[c] for r in rows if r.get(c) is not None]
        return bool(vals) and all(
            isinstance(v, tuple) or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in vals
        )

    align = ["---:" if numeric(c) else "---" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def matrix_markdown(matrix: Any, task_names: Sequence[str], floatfmt: str = ".1f") -> str:
    """The accuracy matrix as a markdown table: row "after <task t>", one column per task, blank above the diagonal."""
    a = lower_triangle(matrix)
    if len(task_names) != len(a):
        raise ValueError(f"matrix_markdown: expected {len(a)} task names, got {len(task_names)}")
    names = [format_cell(n) for n in task_names]
    lines = ["| after \\ on | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for t, row in enumerate(a):
        cells = [format(v, floatfmt) for v in row] + [""] * (len(a) - len(row))
        lines.append(f"| {names[t]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
