"""The TorchTrainer of a fused run (probe -> allocate -> train [-> aggregate -> evaluate] of a task, and
with ``train.run_span: stream`` of every later task), and its Ray Data input.

:func:`make_trainer` wires the pieces: ``ScalingConfig`` from ``train.num_workers`` /
``cpus_per_worker`` / ``use_gpu``; ``RunConfig`` under ``<storage>/<run_id>/train_runs`` with the
name ``task_<t>`` or, for a run spanning the stream, ``stream`` (stable, so a rerun of the driver
continues the same Train run and its checkpoints); ``FailureConfig(max_failures=train.max_failures)``;
and one dataset per task, ``train_<t>``: the task's training shards read with
``ray.data.read_parquet``. With ``train.ingest: stream`` they are decoded and tokenised once
(materialised while they fit a share of the object store) and split over the workers by Ray
Train's ``DataConfig`` (``streaming_split``, order preserved); with ``exact`` (one task per run) they
are expanded into the in-process batch order and sorted, and :class:`RankSplit` hands each worker
its planned rows (cram_ray/train/ingest.py).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cram_ray.pipeline.context import StageContext
from cram_ray.train.ingest import (
    Phase,
    StreamPlan,
    encode_rows,
    expand_rows,
    positions_of,
    select_rank,
    shard_ids,
    shard_paths,
)
from cram_ray.train.worker import FAULT_KEY, FIT_PHASES, train_loop_per_worker

FAULT_ENV = "CRAM_RAY_FAULT"  # JSON {"stage", "step", "rank", "flag"}: tests kill a worker once
RUNS_DIR = "train_runs"
ROWS_PER_PARTITION = 512  # sorted rows per shuffle partition (a partition carries the images)
CACHE_FRACTION = 0.25  # stream ingest: materialise a task's decoded rows up to this share of the object store


def run_name(task: int) -> str:
    return f"task_{task}"


def runs_root(ctx: StageContext) -> str:
    """Where Ray Train keeps the run's checkpoints: beside the ledger, on the same storage."""
    storage = ctx.storage
    return storage.path(f"{ctx.run_id}/{RUNS_DIR}") if storage.local else f"{storage.uri.rstrip('/')}/{ctx.run_id}/{RUNS_DIR}"


class RankSplit(DataConfig):
    """Each worker gets the rows of its slots of every batch, decoded and tokenised.

    Ray's default split (``streaming_split``) hands blocks to whichever worker asks first; here
    the assignment is part of the data, so a run (and its restart) trains on the same batches.
    ``configure`` runs for every worker group, with its size: an elastic restart on fewer workers
    re-splits the same batches.
    """

    def __init__(self, source: str, task: int, plan: StreamPlan) -> None:
        super().__init__(datasets_to_split=[])
        self.source = source
        self.task = task
        self.plan = plan

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank in range(world_size):
                mine = ds.map_batches(select_rank, fn_kwargs={"rank": rank, "micro": self.plan.micro(world_size)},
                                      batch_format="pyarrow") \
                    if world_size > 1 else ds
                mine = mine.map_batches(encode_rows, fn_kwargs={"source": self.source, "task": self.task},
                                        batch_format="numpy", batch_size=64)
                mine.context.execution_options.preserve_order = True  # the sorted stream's order is the plan
                out[rank][name] = mine.iterator()
        return out


def plan_for(ctx: StageContext, task: int, stages: list[str], n: int) -> StreamPlan:
    """The batch order of the sub-stages that train (probe, train), as the in-process stages draw it."""
    from cram_ray.methods import make_method
    from cram_ray.train.zero import micro_batch_size

    train = ctx.cfg.train
    method = make_method(ctx.cfg)  # only asks how many steps the probe takes: no model is built
    probe = method.probe_steps(train.steps_per_task)
    workers = train.max_workers
    for size in range(train.min_workers, workers + 1):  # an elastic run may restart at any size in range
        micro_batch_size(train, size)  # a clear error when the batch does not split
    phases = [
        Phase("probe", probe if "probe" in stages else 0, "probe", shared=workers > 1),
        Phase("train", train.steps_per_task - probe if "train" in stages else 0, "train"),
    ]
    assert [p.name for p in phases] == list(FIT_PHASES)
    return StreamPlan.build(n=n, batch_size=train.batch_size, world_size=workers, seed=train.seed, task=task,
                            phases=phases, mode=train.ingest, shuffle_buffer=train.shuffle_buffer)


def decoded_bytes(ctx: StageContext, task: int) -> int:
    """Rough size of a task's decoded training rows: float32 pixels dominate (token ids are small)."""
    size = ctx.cfg.model.image_size
    return ctx.tasks[task].n_train * (3 * size * size * 4 + 8 * (ctx.cfg.data.max_text_len + ctx.cfg.data.max_answer_len))


def decoded_dataset(ctx: StageContext, tasks: list[int], source: str):
    """The training rows of ``tasks``, read and decoded (lazy), in read order: each task's shards in turn."""
    import ray.data

    storage = ctx.storage
    paths = [p for t in tasks for p in shard_paths(storage, ctx.shard_rel(t, "train"))]
    ds = ray.data.read_parquet(paths, filesystem=storage.fs)
    ds = ds.map_batches(encode_rows, fn_kwargs={"source": source, "task": {ctx.tasks[t].name: t for t in tasks}},
                        batch_format="numpy", batch_size=64)
    ds.context.execution_options.preserve_order = True  # the tasks' rows in the order read: a split is exact
    return ds


def stream_dataset(ctx: StageContext, task: int, source: str):
    """The stream ingest's dataset of one task (see :func:`stream_datasets`). It does not depend on
    which stages the run holds, so it can be built before its run (the executor reads the next
    task's data while a task trains)."""
    return stream_datasets(ctx, [task], source)[task]


def stream_datasets(ctx: StageContext, tasks: list[int], source: str, built: dict[int, Any] | None = None) -> dict[int, Any]:
    """The stream ingest's datasets of ``tasks`` (those in ``built`` are kept): rows read once,
    decoded and tokenised.

    Every epoch of a streaming split re-executes its dataset, so the tasks whose decoded rows
    together fit ``CACHE_FRACTION`` of the object store are materialised (Ray Data's advice for data
    that fits), in ONE Ray Data execution split at the task boundaries (``split_at_indices`` of a
    materialised dataset moves no data): one execution per task costs each its own start-up and
    scheduling. The tasks past that budget stay lazy and stream every epoch (the at-scale path).
    """
    import itertools

    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    out = dict(built or {})
    budget = CACHE_FRACTION * store - sum(decoded_bytes(ctx, t) for t in out)
    together = []
    for t in (t for t in tasks if t not in out):
        if decoded_bytes(ctx, t) <= budget:
            together.append(t)
            budget -= decoded_bytes(ctx, t)
        else:
            out[t] = decoded_dataset(ctx, [t], source)
    if together:
        sizes = [ctx.tasks[t].n_train for t in together]
        rows = decoded_dataset(ctx, together, source).materialize()
        bounds = list(itertools.accumulate(sizes))[:-1]
        parts = rows.split_at_indices(bounds) if bounds else [rows]  # Ray refuses an empty split
        for t, n, part in zip(together, sizes, parts):
            if part.count() != n:  # metadata only
                raise RuntimeError(f"task {t}: {part.count()} training rows read together with the others, {n} expected")
            out[t] = part
    return {t: out[t] for t in tasks}


def train_dataset(ctx: StageContext, task: int, plan_stages: list[str]):
    """(dataset, plan) of the exact ingest: the task's training rows in the fused run's order (lazy;
    nothing is read here but the ``id`` column, to place every record in the plan)."""
    import ray.data

    storage = ctx.storage
    rel = ctx.shard_rel(task, "train")
    paths = shard_paths(storage, rel)
    ids = shard_ids(storage, paths)
    plan = plan_for(ctx, task, plan_stages, len(ids))
    positions = positions_of(ids, storage.path(rel))
    ds = ray.data.read_parquet(paths, filesystem=storage.fs)
    ds = ds.map_batches(expand_rows, fn_kwargs={"plan_json": plan.to_json(), "positions": positions},
                        batch_format="pyarrow", batch_size=None)
    # The range of seq is known: explicit boundaries skip the sampling pass and size the shuffle to
    # the data (Ray's default is 200 partitions: 40 s of task overhead for a few hundred rows here).
    return ds.sort("seq", boundaries=sort_boundaries(plan.total_rows)), plan


def sort_boundaries(rows: int, per_partition: int = ROWS_PER_PARTITION) -> list[int]:
    """Partition boundaries of the plan's ``seq`` range (at least two partitions, as Ray requires)."""
    parts = max(2, -(-rows // per_partition))
    return [max(1, rows * k // parts) for k in range(1, parts)]


Unit = tuple[int, list[str]]  # (task, its consecutive stages) of a Train run
STREAM_RUN = "stream"  # the name of a run spanning the rest of a stream (train.run_span: stream)


def dataset_name(task: int) -> str:
    """The Train dataset holding ``task``'s training rows (``ray.train.get_dataset_shard(name)``)."""
    return f"train_{task}"


def make_trainer(ctx: StageContext, units: list[Unit], source: str, threads: int = 1,
                 datasets: dict[int, Any] | None = None, name: str | None = None) -> TorchTrainer:
    """The TorchTrainer of one fused run over ``units``: each a task and its consecutive stages from
    probe, allocate or train on (a run of several tasks holds every stage of the tasks after the first).
    ``threads``: the driver's intra-op thread count (warm_eval.aggregate_on_workers); ``datasets``:
    tasks' :func:`stream_dataset` already built (stream ingest); ``name``: the Train run's name
    (default ``task_<first task>``)."""
    train = ctx.cfg.train
    tasks = [t for t, _ in units]
    plans = [plan_for(ctx, t, stages, ctx.tasks[t].n_train) for t, stages in units]
    if train.ingest == "stream":
        built = stream_datasets(ctx, tasks, source, datasets)
        data = {dataset_name(t): built[t] for t in tasks}
        # order preserved: which rows reach which rank follows the block layout, not timing
        data_config: DataConfig = DataConfig(execution_options=ExecutionOptions(preserve_order=True))
    else:
        if len(units) != 1:
            raise ValueError("the exact ingest plans one task per Train run (train.run_span: task)")
        ds, plans[0] = train_dataset(ctx, tasks[0], units[0][1])
        data = {dataset_name(tasks[0]): ds}
        data_config = RankSplit(source, tasks[0], plans[0])
    config: dict[str, Any] = {"ctx": ctx.to_json(), "threads": threads,
                              "units": [{"task": t, "stages": list(stages), "plan": plan.to_json()}
                                        for (t, stages), plan in zip(units, plans)]}
    if os.environ.get(FAULT_ENV):
        config[FAULT_KEY] = json.loads(os.environ[FAULT_ENV])
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=RunConfig(
            name=name or run_name(tasks[0]),
            storage_path=runs_root(ctx),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=data,
        dataset_config=data_config,
    )


def run_fused(ctx: StageContext, units: list[Unit], source: str, threads: int = 1,
              datasets: dict[int, Any] | None = None, name: str | None = None) -> dict[str, Any]:
    """Fit one fused run; returns timings (the sub-stages' results are in the ledger)."""
    t0 = time.time()
    trainer = make_trainer(ctx, units, source, threads, datasets, name)
    t_built = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    metrics = dict(result.metrics or {})
    return {"wall": wall, "build": t_built - t0, "metrics": metrics,
            "checkpoint": None if result.checkpoint is None else result.checkpoint.path}
