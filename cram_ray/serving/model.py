"""The continual model of a run after one of its tasks, answering arbitrary records.

:class:`ServedModel` restores the end-of-task state exactly as the evaluation stage does
(``stages.restore`` before that task's evaluate) and answers through the evaluation's own
``stages.answer_records``: the stage, workflows/predict.py and the Serve deployment give the same
answer and routing to the same record. No Ray here: predict uses it in-process, Ray Data actors and
Serve replicas hold one each.
"""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from cram_ray.data.records import DataError, Record
from cram_ray.methods.base import ContinualMethod
from cram_ray.pipeline.context import StageContext, runtime, seed_everything
from cram_ray.serving.run import END_OF_TASK, resolve_after_task


def task_index(names: list[str], task: Optional[str], method: ContinualMethod) -> int:
    """The stream index of a record's task among the tasks served (``names``); -1 when unknown,
    which only a method that routes by the true task id cannot answer."""
    if task in names:
        return names.index(task)
    if method.needs_task_id:
        raise DataError(f"method {method.name} routes by the true task: each record needs its task "
                        f"(one of {', '.join(names)}), got {task!r}")
    return -1


class ServedModel:
    """A run's base with the method's state after task ``after_task``, on the run's device."""

    def __init__(self, ctx: StageContext, after_task: Optional[int] = None) -> None:
        self.ctx = ctx
        self.rt = runtime(ctx)
        # the runtime's base is shared by every model of the process (stages.restore strips and
        # re-attaches adapters on it): answering and swapping the state must not interleave
        self._lock = threading.Lock()
        self.after_task = -1
        self.load(resolve_after_task(ctx, after_task))

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.ctx.tasks]

    @property
    def needs_task_id(self) -> bool:
        return self.method.needs_task_id

    def load(self, after_task: int) -> None:
        """Swap in the end-of-task state of ``after_task`` (blocks answering while it loads)."""
        from cram_ray.pipeline.stages import restore

        if self.ctx.ledger.verify(after_task, END_OF_TASK) is None:
            raise DataError(f"run {self.ctx.run_id}: the end-of-task state of task {after_task} does not verify "
                            f"against its marker ({self.ctx.ledger.rel(after_task, END_OF_TASK)})")
        with self._lock, tempfile.TemporaryDirectory(prefix="cram-serve-") as scratch:
            model, method = restore(self.ctx, after_task, "evaluate", self.rt, Path(scratch))
            seed_everything(self.ctx.cfg.train.seed, after_task, "evaluate")
            if self.ctx.cfg.train.use_gpu and torch.cuda.is_available():
                model.to(torch.device("cuda"))
            self.model, self.method, self.after_task = model, method, after_task

    def task_index(self, task: Optional[str]) -> int:
        return task_index(self.task_names[: self.after_task + 1], task, self.method)

    def answer(self, records: Sequence[Record], task_index: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
        """Per record ``{"answer", "routed_task", "routed_task_name", "group", "weights", "after_task"}``
        (the routing keys the method reports), in batches of the evaluation's batch size."""
        from cram_ray.pipeline.stages import answer_records

        records = list(records)
        index = list(task_index) if task_index is not None else [self.task_index(r.task) for r in records]
        bs = self.ctx.cfg.train.eval_batch_size
        out: list[dict[str, Any]] = []
        with self._lock:
            for a in range(0, len(records), bs):
                out += answer_records(self.rt, self.model, self.method, records[a:a + bs], index[a:a + bs],
                                      self.ctx.cfg.data.max_answer_len)
            after = self.after_task
        names = self.task_names
        rows = []
        for ans in out:
            row: dict[str, Any] = {"answer": ans.pop("prediction")}
            if "routed_task" in ans:
                routed = ans.pop("routed_task")
                row.update(routed_task=routed, routed_task_name=names[routed] if 0 <= routed < len(names) else None)
            rows.append({**row, **ans, "after_task": after})
        return rows

    def experts(self) -> dict[str, Any]:
        """The tasks, groups and per-task experts loaded, from the run's end-of-task reports."""
        ledger = self.ctx.ledger
        tasks = []
        groups: dict[int, list[str]] = {}
        for t in range(self.after_task + 1):
            marker = ledger.marker(t, END_OF_TASK)
            report = marker["result"]["metrics"] if marker else {}
            ranks = report.get("ranks") or {}
            meta = self.ctx.tasks[t]
            entry = {"index": t, "name": meta.name, "metric": meta.metric,
                     "params_added": int(report.get("params_added", 0))}
            entry.update({k: ranks[k] for k in ("rank_max", "rank_sum") if k in ranks})
            if report.get("group") is not None:
                entry["group"] = int(report["group"])
                groups.setdefault(entry["group"], []).append(meta.name)
            tasks.append(entry)
        return {"run_id": self.ctx.run_id, "method": self.method.name, "after_task": self.after_task,
                "after_task_name": self.task_names[self.after_task], "stream_tasks": self.task_names,
                "tasks": tasks, "groups": [{"group": g, "tasks": names} for g, names in sorted(groups.items())]}
