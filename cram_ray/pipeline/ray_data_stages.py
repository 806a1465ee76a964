"""aggregate and evaluate as Ray Data batch inference: ``map_batches`` over an actor pool, no shuffle.

Each actor restores what it needs once (the base VLM and its routing encoders; the method for
evaluate and aggregate) and then processes whatever batches Ray Data streams to it.

* aggregate — each actor computes the routing features of its rows (the costly part: the vision
  tower and the sentence encoder), feeds them to its own copy of the method's
  ``observe(batch, "aggregate")`` and returns the partial statistics that accumulated (per-expert
  sums, counts, the within-task scatter: ``method.take_aggregate_statistics()``) as one row per
  call. The stage merges the rows into its method (``merge_aggregate_statistics``) and calls
  ``end_task()``. Sums do not depend on how the rows were batched beyond float rounding.
* evaluate — the actors hold the restored model + method and run routing, greedy generation and
  scoring per batch of test rows of tasks 0..t; each row comes back with its record id, and the
  stage writes ``predictions.jsonl`` in the in-process order (by the shards' id order) and builds
  the same report.

Batches here are not the in-process stage's batches; what may differ is float rounding in batched
kernels (tests compare the two executors).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cram_ray.pipeline.context import StageContext, runtime, seed_everything
from cram_ray.pipeline.ledger import StageResult
from cram_ray.train.ingest import records_of, shard_ids, shard_paths

AGGREGATE_CALLS_PER_ACTOR = 2  # partial-sum rows per actor: few, a D x D scatter each


def with_split(batch: dict[str, np.ndarray], split_index: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches: tag rows with the index of the split they come from."""
    batch["split"] = np.full(len(batch["id"]), split_index, dtype=np.int64)
    return batch


def split_dataset(ctx: StageContext, splits: list[tuple[int, str]]):
    """The rows of ``(task, split)`` pairs, each tagged with ``split`` (its index in ``splits``)."""
    import ray.data

    from cram_ray.pipeline.ray_cluster import quiet_data

    quiet_data()
    storage = ctx.storage
    parts = []
    for k, (task, split) in enumerate(splits):
        ds = ray.data.read_parquet(shard_paths(storage, ctx.shard_rel(task, split)), filesystem=storage.fs)
        parts.append(ds.map_batches(with_split, fn_kwargs={"split_index": k}, batch_format="numpy", batch_size=None))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _pool(ctx: StageContext, gpu: bool = False) -> dict[str, Any]:
    """An actor pool with one actor per Train worker's worth of resources (a GPU each on GPU clusters)."""
    import ray.data

    train = ctx.cfg.train
    pool: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(min_size=train.min_workers, max_size=train.max_workers),
                            "num_cpus": train.cpus_per_worker}
    if gpu and train.use_gpu:
        pool["num_gpus"] = 1
    return pool


def _restored(ctx: StageContext, task: int, stage: str):
    from cram_ray.pipeline.stages import restore

    rt = runtime(ctx)
    model, method = restore(ctx, task, stage, rt, Path(tempfile.mkdtemp(prefix=f"cram-{stage}-")))
    return rt, model, method


# -- aggregate -------------------------------------------------------------------------------
class PartialStatistics:
    """Actor: the routing features of its rows, observed by its own copy of the method; returns the
    partial statistics of each call as one row."""

    def __init__(self, ctx_json: dict[str, Any], task: int) -> None:
        self.ctx = StageContext.from_json(ctx_json)
        self.task = task
        self.rt, _, self.method = _restored(self.ctx, task, "aggregate")
        self.ready = time.time()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cram_ray.pipeline.stages import with_features

        recs = records_of(rows)
        bs = self.ctx.cfg.train.eval_batch_size
        with torch.no_grad():
            for a in range(0, len(recs), bs):
                part = recs[a:a + bs]
                batch = self.rt.vlm.processor.train_batch(part, [self.task] * len(part))
                self.method.observe(with_features(batch, self.method, self.rt), "aggregate")
        stats = self.method.take_aggregate_statistics()
        return {"rows": np.array([len(recs)], dtype=np.int64), "stats": np.array([save_tensors(stats)], dtype=object),
                "ready": np.array([self.ready])}


def aggregate_call_rows(ctx: StageContext, task: int) -> int:
    """Rows per actor call: whole feature batches, a few calls per actor."""
    bs = ctx.cfg.train.eval_batch_size
    calls = AGGREGATE_CALLS_PER_ACTOR * ctx.cfg.train.max_workers
    batches = -(-ctx.tasks[task].n_train // bs)
    return bs * max(1, -(-batches // calls))


def stage_aggregate_ray(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    """stages.stage_aggregate with the feature pass on a Ray Data actor pool, merged from partial sums."""
    from cram_ray.pipeline.stages import restore, save_state

    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "aggregate", rt, workdir.parent)
    startup = time.time() - t0
    if method.needs_features:
        out = split_dataset(ctx, [(task, "train")]).map_batches(
            PartialStatistics, fn_constructor_kwargs={"ctx_json": ctx.to_json(), "task": task},
            batch_size=aggregate_call_rows(ctx, task), batch_format="numpy", **_pool(ctx))
        seen, ready = 0, []
        for row in out.iter_rows():
            method.merge_aggregate_statistics([dict(load_tensors(bytes(row["stats"])))])
            seen += int(row["rows"])
            ready.append(float(row["ready"]))
        startup = min(ready, default=t0) - t0  # until the first actor could compute: restores and the pool's start
        check_observed(ctx, task, seen)
    report = finish_aggregate(method)
    save_state(method, workdir)
    return StageResult("aggregate", task, report, time.time() - t0, startup)


def check_observed(ctx: StageContext, task: int, seen: int) -> None:
    if seen != ctx.tasks[task].n_train:
        raise RuntimeError(f"aggregate: observed {seen} of task {task}'s {ctx.tasks[task].n_train} records")


def finish_aggregate(method: Any) -> dict[str, Any]:
    """The aggregate stage's report once its statistics are merged: ``end_task`` and the task's size."""
    report = method.end_task()
    report["params_added"] = method.params_added()
    report["ranks"] = method.ranks()
    return report


# -- evaluate --------------------------------------------------------------------------------
class Evaluator:
    """Actor: the restored model + method; greedy answers and scores for every batch of test rows."""

    def __init__(self, ctx_json: dict[str, Any], task: int, splits: list[int]) -> None:
        self.ctx = StageContext.from_json(ctx_json)
        self.splits = splits  # split index -> task index
        self.rt, self.model, self.method = _restored(self.ctx, task, "evaluate")
        seed_everything(self.ctx.cfg.train.seed, task, "evaluate")
        self.device = torch.device("cuda") if self.ctx.cfg.train.use_gpu else torch.device("cpu")
        self.model.to(self.device)
        self.ready = time.time()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cram_ray.pipeline.stages import evaluate_batch

        out: dict[str, list[Any]] = {"split": [], "id": [], "row": []}
        for k in np.unique(rows["split"]):  # a batch may hold the end of one split and the start of the next
            mine = rows["split"] == k
            recs = records_of({c: v[mine] for c, v in rows.items()})
            for row in evaluate_batch(self.ctx, self.rt, self.model, self.method, self.splits[int(k)], recs):
                out["split"].append(int(k))
                out["id"].append(row["id"])
                out["row"].append(json.dumps(row))
        return {"split": np.array(out["split"], dtype=np.int64), "id": np.array(out["id"], dtype=object),
                "row": np.array(out["row"], dtype=object), "ready": np.full(len(out["id"]), self.ready)}


def stage_evaluate_ray(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    """stages.stage_evaluate as Ray Data batch inference over the test sets of tasks 0..task."""
    t0 = time.time()
    splits = list(range(task + 1))
    out = split_dataset(ctx, [(i, "test") for i in splits]).map_batches(
        Evaluator, fn_constructor_kwargs={"ctx_json": ctx.to_json(), "task": task, "splits": splits},
        batch_size=ctx.cfg.train.eval_batch_size, batch_format="numpy", **_pool(ctx, gpu=True))
    by_id: dict[tuple[int, str], dict[str, Any]] = {}
    ready = []
    for r in out.iter_rows():
        by_id[(int(r["split"]), str(r["id"]))] = json.loads(r["row"])
        ready.append(float(r["ready"]))
    startup = min(ready, default=t0) - t0  # until the first actor could answer: the pool's start and restores
    storage = ctx.storage
    per_task = []
    for i in splits:
        ids = shard_ids(storage, shard_paths(storage, ctx.shard_rel(i, "test")))  # the in-process order
        missing = [rid for rid in ids if (i, rid) not in by_id]
        if missing or len(ids) != ctx.tasks[i].n_test:
            raise RuntimeError(f"evaluate: task {i} has no prediction for {len(missing)} of its "
                               f"{len(ids)} test records (first: {missing[:1]})")
        per_task.append([by_id[(i, rid)] for rid in ids])
    return StageResult("evaluate", task, write_evaluation(workdir, task, per_task), time.time() - t0, startup)


def write_evaluation(workdir: Path, task: int, per_task: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """``predictions.jsonl`` (tasks 0..task, each in its shards' order) and the evaluate stage's report:
    the accuracy row, and where the method routes, the routing confusion and accuracy."""
    row: list[float] = []
    confusion: list[list[int]] = []
    with open(workdir / "predictions.jsonl", "w") as fh:
        for rows in per_task:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            row.append(100.0 * float(np.mean([r["score"] for r in rows])))
            routed = [r["routed_task"] for r in rows if "routed_task" in r]
            if routed:
                confusion.append([routed.count(j) for j in range(task + 1)])
    report: dict[str, Any] = {"row": row}
    if confusion:
        report["confusion"] = confusion
        report["routing_accuracy"] = 100.0 * sum(confusion[i][i] for i in range(len(confusion))) / max(
            1, sum(map(sum, confusion)))
    return report
