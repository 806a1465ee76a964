"""A stream's run directory as a model to answer with: which run, its config, its committed tasks.

A run directory is ``<storage>/<run_id>`` (or ``<storage>`` holding exactly one run). Its data
stage's marker records the resolved config and the tasks the run started with, which is all it takes
to rebuild the base and the method; the end-of-task state of task ``t`` is the aggregate stage's
output (what the evaluation of ``t`` restores). A task is *committed* when its aggregate marker and
those of every earlier task are in the ledger: while a restarted stream redoes an earlier task, the
later states on storage are stale and are not offered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pyarrow.fs as pafs

from cram_ray.config import from_dict
from cram_ray.data.records import DataError
from cram_ray.pipeline.context import StageContext, TaskMeta
from cram_ray.pipeline.driver import DATA_STAGE
from cram_ray.pipeline.ledger import MARKER, Ledger, Storage, normalize_location

END_OF_TASK = "aggregate"  # the stage whose state the evaluation of a task restores


@dataclass(frozen=True)
class RunRef:
    """Where a run's ledger lives: the storage root and the run id under it."""

    storage: str  # local absolute path or URI
    run_id: str

    @property
    def location(self) -> str:
        return Storage(self.storage).location(self.run_id)


def _parent(location: str) -> tuple[str, str]:
    head, _, name = location.rstrip("/").rpartition("/")
    return head, name


def _has_data_marker(store: Storage, rel: str) -> bool:
    return store.exists(f"{rel}/{DATA_STAGE}/{MARKER}" if rel else f"{DATA_STAGE}/{MARKER}")


def find_run(run_dir: str) -> RunRef:
    """The run at ``run_dir`` (``<storage>/<run_id>``), or the only run inside ``run_dir``."""
    location = normalize_location(run_dir)
    store = Storage(location)
    if not store.exists(""):
        raise DataError(f"--run {run_dir}: no such directory")
    if _has_data_marker(store, ""):
        storage, run_id = _parent(location)
        return RunRef(storage, run_id)
    children = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=False))
    runs = sorted(info.base_name for info in children
                  if info.type == pafs.FileType.Directory and _has_data_marker(store, info.base_name))
    if len(runs) == 1:
        return RunRef(location, runs[0])
    if not runs:
        raise DataError(f"--run {run_dir}: not a stream's run directory (expected <out>/<run_id> with "
                        f"{DATA_STAGE}/{MARKER}, or an --out holding one run)")
    raise DataError(f"--run {run_dir}: holds {len(runs)} runs ({', '.join(runs)}); pass --run {run_dir}/<run_id>")


def run_context(ref: RunRef) -> StageContext:
    """The stage context the run's stages saw, rebuilt from its data marker.

    Storage is where the run is found now (the run may have been copied), and stages of this
    process never train: the executor is local (a ZeRO-3 stage's private copy of the base is a
    training concern only)."""
    ledger = Ledger(Storage(ref.storage), ref.run_id)
    marker = ledger.marker(-1, DATA_STAGE)
    if marker is None:
        raise DataError(f"{ref.location}/{DATA_STAGE}/{MARKER}: missing or damaged (the run records its "
                        "config and tasks there when it starts)")
    metrics = marker["result"]["metrics"]
    cfg = from_dict(metrics["config"]).replace(**{"storage": ref.storage, "train.executor": "local"})
    return StageContext(cfg, ref.run_id, [TaskMeta(**t) for t in metrics["tasks"]])


def committed_tasks(ctx: StageContext) -> int:
    """How many tasks, from the first on, have their end-of-task state committed in the ledger."""
    ledger = ctx.ledger
    n = 0
    while n < len(ctx.tasks) and ledger.marker(n, END_OF_TASK) is not None:
        n += 1
    return n


def resolve_after_task(ctx: StageContext, after_task: Optional[int]) -> int:
    """``after_task`` checked against the run (default: the last committed task)."""
    n = committed_tasks(ctx)
    names = [t.name for t in ctx.tasks]
    if after_task is None:
        if n == 0:
            raise DataError(f"run {ctx.run_id}: no task has finished yet (the first, {names[0]!r}, commits its "
                            f"state at its {END_OF_TASK} stage); wait, or serve with --follow")
        return n - 1
    if not 0 <= after_task < len(names):
        raise DataError(f"--after-task {after_task}: the run has tasks 0..{len(names) - 1} ({', '.join(names)})")
    if after_task >= n:
        raise DataError(f"--after-task {after_task}: task {names[after_task]!r} has not finished "
                        f"(committed: {', '.join(names[:n]) or 'none'})")
    return after_task
