"""Progress of an optimizer loop: what a person watching the run reads, and the loss curve it keeps.

On a terminal the loop shows a tqdm bar; in a log file or under Ray (workers' stdout is a pipe)
it prints a plain line every ``every_steps`` steps or ``every_seconds`` seconds, whichever comes
first, e.g. ``[task 3/8 ocr] train 300/570 4.1 it/s ETA 2m10s loss=0.8123``. Either way it records
the per-step loss and hands it back as a compact curve (at most ``MAX_POINTS`` bucket means) that
the stage result carries to the driver, which logs it to MLflow: workers never talk to MLflow.
No Ray import here.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

MAX_POINTS = 200


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; ``9`` -> ``9s``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def task_prefix(task: int, n_tasks: int, name: str) -> str:
    """``[task 3/8 ocr]`` for task index 2 of 8 (counted from 1 for people; directories use ``task_2``)."""
    return f"[task {task + 1}/{n_tasks} {name}]"


def compact_curve(steps: list[int], values: list[float], max_points: int = MAX_POINTS) -> dict[str, list]:
    """At most ``max_points`` points: consecutive steps averaged in equal buckets, each bucket
    labelled with its last step (so the final point is the final step)."""
    n = len(steps)
    size = max(1, math.ceil(n / max_points))
    out_steps, out_values = [], []
    for i in range(0, n, size):
        chunk = values[i:i + size]
        out_steps.append(int(steps[min(i + size, n) - 1]))
        out_values.append(float(sum(chunk) / len(chunk)))
    return {"step": out_steps, "loss": out_values}


class StepProgress:
    """Reports ``total`` optimizer steps under a ``label`` and records the loss of each.

    Args:
        label: what the line says before the counts (``train``); ``log`` adds the task prefix.
        total: the number of steps of the whole fit (a resumed fit starts at :meth:`begin`'s step).
        log: prints one line (the stage's logger, which prefixes ``[task t/T name]``).
        every_steps / every_seconds: plain-line cadence when not on a terminal (0 = never by that
            rule; both 0 = no lines at all).
        bar: a tqdm bar instead of lines; default: when stderr is a terminal.
    """

    EVERY_SECONDS = 30.0

    def __init__(self, label: str, total: int, *, log: Callable[[str], None] = print,
                 every_steps: int = 50, every_seconds: float = EVERY_SECONDS, bar: Optional[bool] = None) -> None:
        self.label = label
        self.total = total
        self.log = log
        self.start = 0
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._t0 = time.time()
        self._last_line = self._t0
        self._bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=label, unit="it", leave=False, dynamic_ncols=True)

    def rate(self, step: int) -> float:
        """Steps per second since this fit (or its resume) started."""
        elapsed = time.time() - self._t0
        return (step - self.start) / elapsed if elapsed > 0 else float("nan")

    def line(self, step: int, terms: dict[str, float]) -> str:
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        losses = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
        return f" {self.label} {step}/{self.total} {rate:.2f} it/s ETA {duration(eta)} {losses}".rstrip()

    def begin(self, step: int = 0) -> None:
        """The loop starts (at ``step`` when resumed from a checkpoint): rates and ETA count from here,
        not from engine start-up."""
        self.start = step
        self._t0 = self._last_line = time.time()
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(step)

    def update(self, step: int, terms: dict[str, float], extra: str = "") -> None:
        """Step ``step`` (1-based, counted from the fit's start) finished with loss ``terms``."""
        self.steps.append(step)
        self.losses.append(float(sum(terms.values())))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
            return
        if not (self.every_steps or self.every_seconds):
            return
        now = time.time()
        due = (self.every_steps and step % self.every_steps == 0) or (
            self.every_seconds and now - self._last_line >= self.every_seconds)
        if due or step == self.total:
            self._last_line = now
            self.log(self.line(step, terms) + extra)

    def close(self) -> dict[str, list]:
        """End the bar and print the fit's last line; returns the compact loss curve."""
        if self._bar is not None:
            self._bar.close()
            if self.steps:
                elapsed = time.time() - self._t0
                self.log(f" {self.label} {self.steps[-1]}/{self.total} in {duration(elapsed)} "
                         f"({self.rate(self.steps[-1]):.2f} it/s)")
        return compact_curve(self.steps, self.losses)
