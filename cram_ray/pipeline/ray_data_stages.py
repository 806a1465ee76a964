"""aggregate and evaluate as Ray Data passes, with the in-process stages' numbers.

Both stages group the rows of a split into exactly the batches the in-process stage forms
(``batches_of(records, eval_batch_size, arange)``: position ``p`` goes to batch ``p // bs``; the
position comes from each shard's ``id`` column) with ``groupby(...).map_groups`` on an actor pool.
Each actor restores the base VLM (and, for evaluate, the method) once. Because every batch has
the in-process composition, the features and the greedy generations are bit-identical to the
in-process stage's, whatever actor computes them.

* aggregate — the actors build each training batch and compute its routing features (the costly
  part: the vision tower and the sentence encoder) and return it as one row (the batch's tensors
  as safetensors bytes). The stage then calls ``method.observe(batch, "aggregate")`` on the batches
  in their in-process order, in ONE process, and ``end_task()``. ``observe`` is a cheap
  accumulation (sums, counts, a scatter matrix), and the method interface has no merge of
  partial statistics, so reducing in one place is both exact and method-agnostic.
* evaluate — the actors hold the restored model + method and run routing, greedy generation and
  scoring per test batch of tasks 0..t (Ray Data batch inference); the stage gathers the scored
  rows (small), writes ``predictions.jsonl`` in the in-process order and builds the same report.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cram_ray.pipeline.context import StageContext, runtime, seed_everything
from cram_ray.pipeline.ledger import StageResult
from cram_ray.train.ingest import positions_of, records_of, shard_ids, shard_paths

GROUP_STRIDE = 1 << 32  # group key = split index * stride + batch index


def add_groups(batch: dict[str, np.ndarray], positions: dict[str, int], split_index: int, batch_size: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches: each row's position and the in-process batch it belongs to."""
    pos = np.array([positions[str(i)] for i in batch["id"]], dtype=np.int64)
    batch["pos"] = pos
    batch["split"] = np.full(len(pos), split_index, dtype=np.int64)
    batch["group"] = split_index * GROUP_STRIDE + pos // batch_size
    return batch


def split_dataset(ctx: StageContext, splits: list[tuple[int, str]]):
    """The rows of ``(task, split)`` pairs, each with ``pos``, ``split`` (index in ``splits``), ``group``."""
    import ray.data

    from cram_ray.pipeline.ray_cluster import quiet_data

    quiet_data()
    storage = ctx.storage
    bs = ctx.cfg.train.eval_batch_size
    parts = []
    for k, (task, split) in enumerate(splits):
        rel = ctx.shard_rel(task, split)
        paths = shard_paths(storage, rel)
        positions = positions_of(shard_ids(storage, paths), storage.path(rel))
        ds = ray.data.read_parquet(paths, filesystem=storage.fs)
        parts.append(ds.map_batches(add_groups, fn_kwargs={"positions": positions, "split_index": k, "batch_size": bs},
                                    batch_format="numpy", batch_size=None))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _in_order(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(batch["pos"], kind="stable")
    return {k: v[order] for k, v in batch.items()}


def group_partitions(ctx: StageContext, splits: list[tuple[int, str]]) -> int:
    """Hash partitions of the groupby: one per batch at most (Ray's default of 200 costs ~40 s of
    task overhead on a small split), and a few per actor so the pool stays busy."""
    bs = ctx.cfg.train.eval_batch_size
    meta = {"train": lambda t: ctx.tasks[t].n_train, "test": lambda t: ctx.tasks[t].n_test}
    batches = sum(-(-meta[split](task) // bs) for task, split in splits)
    return max(1, min(batches, 4 * ctx.cfg.train.max_workers))


def _pool(ctx: StageContext, gpu: bool = False) -> dict[str, Any]:
    """One actor per Train worker's worth of resources (a GPU each for generation on GPU clusters)."""
    train = ctx.cfg.train
    pool: dict[str, Any] = {"concurrency": train.workers, "num_cpus": train.cpus_per_worker}
    if gpu and train.use_gpu:
        pool["num_gpus"] = 1
    return pool


# -- aggregate -------------------------------------------------------------------------------
class FeatureBatches:
    """Actor: one in-process training batch per group, with its routing features, as one row."""

    def __init__(self, ctx_json: dict[str, Any], task: int, needs: list[str]) -> None:
        self.ctx = StageContext.from_json(ctx_json)
        self.task = task
        self.needs = frozenset(needs)
        self.rt = runtime(self.ctx)

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cram_ray.models.features import add_routing_features

        group = _in_order(group)
        recs = records_of(group)
        batch = self.rt.vlm.processor.train_batch(recs, [self.task] * len(recs))
        with torch.no_grad():
            add_routing_features(batch, self.needs, self.rt.image_encoder, self.rt.text_encoder)
        tensors = {k: v.contiguous() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        other = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
        return {"group": np.array([int(group["group"][0])], dtype=np.int64),
                "tensors": np.array([save_tensors(tensors)], dtype=object),
                "other": np.array([json.dumps(other)], dtype=object)}


def unpack_batch(row_tensors: bytes, row_other: str) -> dict[str, Any]:
    batch: dict[str, Any] = dict(load_tensors(bytes(row_tensors)))
    batch.update(json.loads(row_other))
    return batch


def stage_aggregate_ray(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    """stages.stage_aggregate with the feature pass on a Ray Data actor pool."""
    from cram_ray.pipeline.stages import restore, save_state

    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "aggregate", rt, workdir.parent)
    startup = time.time() - t0
    if method.needs_features:
        splits = [(task, "train")]
        out = split_dataset(ctx, splits).groupby("group", num_partitions=group_partitions(ctx, splits)).map_groups(
            FeatureBatches, fn_constructor_kwargs={"ctx_json": ctx.to_json(), "task": task,
                                                   "needs": sorted(method.needs_features)},
            batch_format="numpy", **_pool(ctx))
        rows = sorted(out.iter_rows(), key=lambda r: int(r["group"]))  # one small row per batch
        with torch.no_grad():
            for row in rows:
                method.observe(unpack_batch(row["tensors"], row["other"]), "aggregate")
    report = method.end_task()
    report["params_added"] = method.params_added()
    report["ranks"] = method.ranks()
    save_state(method, workdir)
    return StageResult("aggregate", task, report, time.time() - t0, startup)


# -- evaluate --------------------------------------------------------------------------------
class Evaluator:
    """Actor: the restored model + method; greedy answers and scores for one test batch per group."""

    def __init__(self, ctx_json: dict[str, Any], task: int, splits: list[int]) -> None:
        import tempfile

        from cram_ray.pipeline.stages import restore

        self.ctx = StageContext.from_json(ctx_json)
        self.task = task
        self.splits = splits  # split index -> task index
        self.rt = runtime(self.ctx)
        self.model, self.method = restore(self.ctx, task, "evaluate", self.rt, Path(tempfile.mkdtemp(prefix="cram-eval-")))
        seed_everything(self.ctx.cfg.train.seed, task, "evaluate")
        self.device = torch.device("cuda") if self.ctx.cfg.train.use_gpu else torch.device("cpu")
        self.model.to(self.device)
        self.vlm = replace(self.rt.vlm, model=self.model)

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cram_ray.eval.scorers import score
        from cram_ray.pipeline.stages import with_features

        group = _in_order(group)
        i = self.splits[int(group["split"][0])]
        recs = records_of(group)
        batch = with_features(self.rt.vlm.processor.prompt_batch(recs, [i] * len(recs)), self.method, self.rt)
        if self.device.type != "cpu":
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            self.method.route(batch, training=False)
            preds = self.vlm.generate(batch, self.ctx.cfg.data.max_answer_len)
        choice = self.method.routed_task()
        rows = []
        for j, (rec, pred) in enumerate(zip(recs, preds)):
            row = {"id": rec.id, "task": rec.task, "prediction": pred, "answer": rec.answer,
                   "score": score(rec.metric, pred, rec.answer)}
            if choice is not None:
                row["routed_task"] = int(choice[j])
            rows.append(row)
        return {"split": group["split"], "pos": group["pos"],
                "row": np.array([json.dumps(r) for r in rows], dtype=object)}


def stage_evaluate_ray(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    """stages.stage_evaluate as Ray Data batch inference over the test sets of tasks 0..task."""
    t0 = time.time()
    splits = list(range(task + 1))
    pairs = [(i, "test") for i in splits]
    out = split_dataset(ctx, pairs).groupby("group", num_partitions=group_partitions(ctx, pairs)).map_groups(
        Evaluator, fn_constructor_kwargs={"ctx_json": ctx.to_json(), "task": task, "splits": splits},
        batch_format="numpy", **_pool(ctx, gpu=True))
    got = sorted(((int(r["split"]), int(r["pos"]), json.loads(r["row"])) for r in out.iter_rows()),
                 key=lambda x: x[:2])
    startup = 0.0  # the actors' model restore overlaps the reads; it is part of the pass
    row: list[float] = []
    confusion: list[list[int]] = []
    with open(workdir / "predictions.jsonl", "w") as fh:
        for i in splits:
            rows = [r for s, _, r in got if s == i]
            if len(rows) != ctx.tasks[i].n_test:
                raise RuntimeError(f"evaluate: task {i} produced {len(rows)} predictions for {ctx.tasks[i].n_test} records")
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
    print(f"[task {task} {ctx.tasks[task].name} / evaluate] scores " + " ".join(f"{v:.1f}" for v in row), flush=True)
    return StageResult("evaluate", task, report, time.time() - t0, startup)
