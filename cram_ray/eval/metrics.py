"""Continual-learning metrics on the accuracy matrix, and routing accuracy (docs/DESIGN.md §7).

The accuracy matrix ``a[t][i]`` is the score on task ``i`` after training task ``t`` (``i <= t``);
only the lower triangle (diagonal included) is read. It may be given as ragged lists (row ``t`` of
length ``t + 1``) or square (lists or a numpy array) with anything -- None, NaN, real numbers --
above the diagonal. The metrics are in the matrix's own unit (the pipeline uses percent).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def lower_triangle(matrix: Any) -> list[list[float]]:
    """Rows ``a[t][0..t]`` as floats; raises ValueError if a lower-triangle entry is missing."""
    rows = [list(r) for r in (matrix.tolist() if isinstance(matrix, np.ndarray) else matrix)]
    if not rows:
        raise ValueError("accuracy matrix: expected at least one row, got none")
    out: list[list[float]] = []
    for t, row in enumerate(rows):
        if len(row) < t + 1:
            raise ValueError(f"accuracy matrix row {t}: expected at least {t + 1} entries, got {len(row)}")
        vals = []
        for i, v in enumerate(row[: t + 1]):
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"accuracy matrix entry [{t}][{i}]: expected a finite number, got {v!r}")
            vals.append(float(v))
        out.append(vals)
    return out


def summarize(matrix: Any) -> dict[str, float]:
    """MFT, MFN, MAA and BWT of a lower-triangular accuracy matrix.

    With T the last task index (0-based):

    - MFT = mean_i a[i][i]                     (each task just after learning it)
    - MFN = mean_{i<=T} a[T][i]                 (every task at the end of the stream; "Last")
    - MAA = mean_t mean_{i<=t} a[t][i]          (average accuracy along the stream)
    - BWT = mean_{i<T} (a[T][i] - a[i][i])      (forgetting; 0.0 for a single task)

    BWT is docs/DESIGN.md's 1/(T-1) sum_{i<T} with T counted 1-based (the number of tasks): an average over
    the T tasks before the last one.
    """
    a = lower_triangle(matrix)
    last = len(a) - 1
    diag = [a[i][i] for i in range(last + 1)]
    mft = sum(diag) / len(diag)
    mfn = sum(a[last]) / len(a[last])
    maa = sum(sum(row) / len(row) for row in a) / len(a)
    bwt = sum(a[last][i] - a[i][i] for i in range(last)) / last if last > 0 else 0.0
    return {"mft": mft, "mfn": mfn, "maa": maa, "bwt": bwt}


def _check_routing(routed: Sequence[int], true: Sequence[int]) -> None:
    if len(routed) != len(true):
        raise ValueError(f"routing: expected as many routed as true task ids, got {len(routed)} and {len(true)}")
    if not true:
        raise ValueError("routing: expected at least one sample, got none")


def routing_accuracy(routed: Sequence[int], true: Sequence[int]) -> float:
    """Share (in [0, 1], not percent) of samples routed to their own task's expert."""
    _check_routing(routed, true)
    return sum(int(r) == int(t) for r, t in zip(routed, true)) / len(true)


def confusion(routed: Sequence[int], true: Sequence[int], n_tasks: int) -> list[list[int]]:
    """Counts ``conf[true_task][routed_task]``: rows are the samples' own tasks, columns where they went."""
    _check_routing(routed, true)
    conf = [[0] * n_tasks for _ in range(n_tasks)]
    for k, (r, t) in enumerate(zip(routed, true)):
        r, t = int(r), int(t)
        if not (0 <= r < n_tasks and 0 <= t < n_tasks):
            raise ValueError(f"routing sample {k}: task ids ({t} true, {r} routed) outside 0..{n_tasks - 1}")
        conf[t][r] += 1
    return conf


def to_square(matrix: Any) -> np.ndarray:
    """The lower triangle as a square float array with NaN above the diagonal (for plots, tables)."""
    a = lower_triangle(matrix)
    out = np.full((len(a), len(a)), np.nan)
    for t, row in enumerate(a):
        out[t, : t + 1] = row
    return out
