"""Preparing a benchmark once per content: parquet shards of every task and split, committed whole.

A prepared dataset is one folder ``<rel>/`` of a :class:`~cram_ray.pipeline.ledger.Storage`::

    <rel>/<task>/<split>/part-*.parquet   records with the image files' own bytes
    <rel>/files.json                      the benchmark's files and their SHA-256 (names what changed)
    <rel>/_DONE.json                      written last: benchmark name, content hash, tasks and counts

The process that prepares holds only metadata (ids, image paths, instructions, answers). Images are
read, limit-checked and decode-checked batch by batch: with Ray, a Ray Data job (``from_items`` of the
metadata rows, ``map_batches`` to load the images on the cluster, ``write_parquet``); without Ray, the
same batch function in this process, one shard at a time. Either way the shards go to a temporary
folder that is renamed into place once complete, so a crash never leaves a half dataset under
``<rel>``; on an object store (no rename) the folder is written in place and ``_DONE.json`` alone
says it is complete.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from typing import Any, Callable, Optional

import pyarrow as pa

from cram_ray.data.identity import Identity
from cram_ray.data.manifest import SPLITS, Benchmark, Limits, TaskData, load_image
from cram_ray.data.records import DataError
from cram_ray.data.shards import SCHEMA, shard_name, write_table

MARKER = "_DONE.json"
FILES = "files.json"
DATASETS = "datasets"
ROWS_PER_SHARD = 512
# a worker's DataError as a remote traceback prints it (its message is always one line)
_REMOTE_DATA_ERROR = re.compile(r"DataError: (.+)")


def dataset_rel(identity: Identity) -> str:
    """Where the stream's prepared data of this content lives under the storage root."""
    return f"{DATASETS}/{identity.key}"


def find(storage: Any, rel: str) -> Optional[dict[str, Any]]:
    """The marker of a complete prepared dataset at ``rel``, or None."""
    if not storage.exists(f"{rel}/{MARKER}"):
        return None
    try:
        return json.loads(storage.read_bytes(f"{rel}/{MARKER}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _metadata_rows(task: TaskData, split: str) -> list[dict[str, Any]]:
    where = str(task.path(split))
    return [{"id": e.id, "image": e.image, "instruction": e.instruction, "answer": e.answer,
             "answers": None if e.answers is None else list(e.answers), "where": f"{where}: {e.label}"}
            for e in task.entries(split)]


class LoadImages:
    """A batch of metadata rows -> a batch of shard rows (image bytes read and checked)."""

    def __init__(self, task: str, metric: str, limits: Limits) -> None:
        self.task, self.metric, self.limits = task, metric, limits

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        cols = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        images = [None if path is None else load_image(path, self.limits, where)
                  for path, where in zip(cols["image"], cols["where"])]
        n = len(images)
        return pa.Table.from_pydict({
            "id": cols["id"], "task": [self.task] * n, "image": images, "instruction": cols["instruction"],
            "answer": cols["answer"], "metric": [self.metric] * n, "answers": cols["answers"]}, schema=SCHEMA)


class _ShardNames:
    """``part-<write task, 5 digits>_<write uuid>``: sorted names keep Ray Data's (ordered) blocks in order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}_{write_uuid}"


def _unwrap(err: BaseException) -> Optional[DataError]:
    """The DataError a Ray worker raised, from what Ray Data hands back: the worker's exception
    object when Ray kept it (``cause``, ``__cause__``), else its one-line message in the remote
    traceback text."""
    seen = set()
    stack: list[Optional[BaseException]] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is DataError:
            return e
        cause = getattr(e, "cause", None)  # RayTaskError keeps the worker's own exception here
        stack.extend([cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__])
    found = _REMOTE_DATA_ERROR.search(str(err))
    return DataError(found.group(1)) if found else None


def _write_split_ray(task: TaskData, split: str, fs: Any, path: str, rows_per_shard: int) -> None:
    import ray.data
    from ray.data.datasource import FilenameProvider

    class ShardNames(_ShardNames, FilenameProvider):
        pass

    rows = _metadata_rows(task, split)
    data_ctx = ray.data.DataContext.get_current()
    before = data_ctx.execution_options.preserve_order
    data_ctx.execution_options.preserve_order = True  # shards keep the JSON file's record order
    try:
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / rows_per_shard))
        ds = ds.map_batches(LoadImages(task.name, task.metric, task.limits), batch_format="pyarrow",
                            batch_size=None)
        ds.write_parquet(path, filesystem=fs, filename_provider=ShardNames(), compression="zstd")
    except Exception as err:
        data_err = _unwrap(err)
        if data_err is None:
            raise
        raise data_err from None
    finally:
        data_ctx.execution_options.preserve_order = before


def _write_split_local(task: TaskData, split: str, fs: Any, path: str, rows_per_shard: int) -> None:
    rows = _metadata_rows(task, split)
    load = LoadImages(task.name, task.metric, task.limits)
    fs.create_dir(path, recursive=True)
    for k, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start:start + rows_per_shard]
        write_table(load({key: [r[key] for r in chunk] for key in chunk[0]}), f"{path}/{shard_name(k)}", fs)


def prepare(bench: Benchmark, identity: Identity, storage: Any, rel: str, *, use_ray: bool, rows_per_shard: int = ROWS_PER_SHARD,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``bench`` as a prepared dataset at ``rel`` unless one of the same content is there;
    returns its marker. ``use_ray`` runs the image pass as Ray Data jobs (Ray must be initialised).

    Raises:
        DataError: a bad record (one line naming file and record), or ``rel`` holding other data.
    """
    if rows_per_shard < 1:
        raise ValueError(f"prepare: rows_per_shard must be >= 1, got {rows_per_shard}")
    found = find(storage, rel)
    if found is not None:
        if found.get("hash") != identity.hash:
            raise DataError(f"{storage.path(rel)}: holds prepared data of another benchmark "
                            f"({found.get('benchmark')!r}); choose another output folder")
        log(f"[data] {bench.name}: shards {identity.key} found, nothing to prepare")
        return found
    if storage.exists(rel) and storage.local:
        raise DataError(f"{storage.path(rel)}: exists and is not a prepared dataset; choose another output folder")
    t0 = time.time()
    parent, _, leaf = rel.rpartition("/")
    work = f"{parent}/.tmp-{leaf}-{uuid.uuid4().hex[:8]}".lstrip("/") if storage.local else rel
    if not storage.local:
        storage.remove(rel)  # an unmarked folder is a crashed attempt
    write = _write_split_ray if use_ray else _write_split_local
    tasks = []
    try:
        for task in bench.tasks:
            counts = {}
            for split in SPLITS:
                write(task, split, storage.fs, storage.path(f"{work}/{task.name}/{split}"), rows_per_shard)
                counts[split] = len(task.entries(split))
            tasks.append({"name": task.name, "metric": task.metric, **counts})
        storage.write_bytes_atomic(f"{work}/{FILES}", json.dumps(identity.files, indent=0).encode())
        marker = {"benchmark": bench.name, "manifest": str(bench.path), "hash": identity.hash, "tasks": tasks,
                  "engine": "ray_data" if use_ray else "local", "seconds": time.time() - t0}
        storage.write_bytes_atomic(f"{work}/{MARKER}", json.dumps(marker, indent=1).encode())
        if storage.local:
            _commit_local(storage.path(work), storage.path(rel))
    finally:
        if storage.local and storage.exists(work):
            shutil.rmtree(storage.path(work), ignore_errors=True)
    n = sum(t["train"] + t["test"] for t in tasks)
    log(f"[data] {bench.name}: {len(tasks)} tasks, {n} records prepared as shards {identity.key} "
        f"in {time.time() - t0:.1f}s ({marker['engine']})")
    return find(storage, rel) or marker


def _commit_local(work: str, final: str) -> None:
    try:
        os.rename(work, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, MARKER)):
            raise
        # another stream prepared the same content meanwhile: theirs is identical, ours is dropped
