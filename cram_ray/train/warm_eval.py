"""aggregate and evaluate on the warm workers of a task's Train run (``train.fuse_eval``).

Starting a Ray Data actor pool per stage costs more than the stage computes on small models
(docs/performance.md), while the Train run's workers already hold the runtime. So after the fused
run commits train, every rank restores the trained state exactly as the stand-alone stages do and
takes a deterministic share of the work: the batches of ``train.eval_batch_size`` records that the
in-process stages draw (same boundaries, so each batch is padded and routed as there), a
contiguous run of them per rank.

* aggregate: each rank observes its batches of the task's training records and hands the partial
  statistics (``take_aggregate_statistics``, as safetensors bytes) to rank 0, which merges them in
  rank order (``merge_aggregate_statistics``) and finishes the task, as the Ray Data stage does.
* evaluate: each rank answers its batches of the test sets of tasks 0..t; rank 0 gathers the
  rows, which in batch order are the in-process order, and writes the same predictions and report.

Both return the stage's report on rank 0 and None elsewhere; the caller (worker.py) commits it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cram_ray.data.records import Record
from cram_ray.methods.base import ContinualMethod
from cram_ray.pipeline.context import Runtime, StageContext, seed_everything
from cram_ray.pipeline.ray_data_stages import check_observed, finish_aggregate, write_evaluation
from cram_ray.pipeline.stages import evaluate_batch
from cram_ray.train.ingest import read_rows, shard_paths

Span = tuple[int, int, int]  # (split index, first record, end record) of one batch


def batch_spans(sizes: list[int], batch_size: int) -> list[Span]:
    """Every batch of ``batch_size`` records over splits of ``sizes`` records, in order (a split's
    last batch may be short, as in ``stages.batches_of``)."""
    return [(k, a, min(a + batch_size, n)) for k, n in enumerate(sizes) for a in range(0, n, batch_size)]


def share(spans: list[Span], rank: int, world_size: int) -> list[Span]:
    """Rank ``rank``'s contiguous run of ``spans``; the runs of ranks 0..W-1 concatenate to ``spans``."""
    n = len(spans)
    return spans[rank * n // world_size:(rank + 1) * n // world_size]


def batches(ctx: StageContext, spans: list[Span], rel_of: Callable[[int], str]) -> Iterator[list[Record]]:
    """The records of each span; each split's covered range is read once."""
    storage = ctx.storage
    k = 0
    while k < len(spans):
        split = spans[k][0]
        run = [s for s in spans[k:] if s[0] == split]  # spans of one split are consecutive
        first = run[0][1]
        recs = read_rows(storage, shard_paths(storage, rel_of(split)), first, run[-1][2])
        for _, a, b in run:
            yield recs[a - first:b - first]
        k += len(run)


def gather_to_first(value: Any) -> Optional[list[Any]]:
    """Every rank's ``value`` in rank order on rank 0 (None elsewhere); a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def aggregate_on_workers(ctx: StageContext, task: int, rt: Runtime, method: ContinualMethod, *, rank: int,
                         world_size: int, threads: int) -> Optional[dict[str, Any]]:
    """The aggregate stage's report on rank 0 (``method`` then holds the merged statistics).

    ``threads``: the driver's intra-op thread count, used for the merge and ``end_task``, whose float
    reductions depend on it in the last bits (as ``ray_executor`` does for the stand-alone stage).
    """
    from cram_ray.pipeline.stages import with_features

    if not method.needs_features:
        return finish_aggregate(method) if rank == 0 else None
    spans = share(batch_spans([ctx.tasks[task].n_train], ctx.cfg.train.eval_batch_size), rank, world_size)
    seen = 0
    with torch.no_grad():
        for recs in batches(ctx, spans, lambda _: ctx.shard_rel(task, "train")):
            batch = rt.vlm.processor.train_batch(recs, [task] * len(recs))
            method.observe(with_features(batch, method, rt), "aggregate")
            seen += len(recs)
    parts = gather_to_first((seen, save_tensors(method.take_aggregate_statistics())))
    if parts is None:
        return None
    check_observed(ctx, task, sum(n for n, _ in parts))
    with intra_op_threads(threads):
        method.merge_aggregate_statistics([dict(load_tensors(blob)) for _, blob in parts])
        return finish_aggregate(method)


def evaluate_on_workers(ctx: StageContext, task: int, rt: Runtime, model: torch.nn.Module, method: ContinualMethod,
                        *, rank: int, world_size: int, device: torch.device, workdir: Path,
                        before_batch: Callable[[int], None]) -> Optional[dict[str, Any]]:
    """The evaluate stage's report on rank 0, with ``predictions.jsonl`` written into ``workdir``.

    ``before_batch(k)`` is called before this rank's ``k``-th batch (the tests' fault hook).
    """
    seed_everything(ctx.cfg.train.seed, task, "evaluate")
    model.to(device)
    spans = batch_spans([ctx.tasks[i].n_test for i in range(task + 1)], ctx.cfg.train.eval_batch_size)
    mine = share(spans, rank, world_size)
    answers = []
    for k, ((i, _, _), recs) in enumerate(zip(mine, batches(ctx, mine, lambda i: ctx.shard_rel(i, "test")))):
        before_batch(k)
        answers.append(evaluate_batch(ctx, rt, model, method, i, recs))
    parts = gather_to_first(answers)
    if parts is None:
        return None
    per_task: list[list[dict[str, Any]]] = [[] for _ in range(task + 1)]
    for (i, _, _), rows in zip(spans, (rows for part in parts for rows in part)):
        per_task[i].extend(rows)
    for i, rows in enumerate(per_task):
        if len(rows) != ctx.tasks[i].n_test:
            raise RuntimeError(f"evaluate: {len(rows)} answers for task {i}'s {ctx.tasks[i].n_test} test records")
    return write_evaluation(workdir, task, per_task)
