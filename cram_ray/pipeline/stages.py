"""The five per-task stages of docs/DESIGN.md §2 as plain functions of explicit inputs and outputs.

``stage(ctx, task, workdir) -> StageResult``: each reads the stream state the previous stage left
on storage, does its work, and writes its outputs (the new state as safetensors + JSON, reports,
predictions) into ``workdir``; the executor then commits them with a marker. No Ray here: the
in-process executor calls these directly and the Ray executor launches the same functions.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cram_ray.data.records import Record
from cram_ray.methods import make_method
from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.pipeline.context import StageContext, Runtime, runtime, seed_everything, task_records
from cram_ray.pipeline.ledger import STAGES, StageResult
from cram_ray.train.ingest import epoch_order
from cram_ray.train.loop import cycle, fit_steps
from cram_ray.train.progress import StepProgress, task_prefix

if TYPE_CHECKING:
    from cram_ray.models.features import ImageFeatureCache

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"


# -- state on storage ------------------------------------------------------------------------
def save_state(method: ContinualMethod, workdir: Path) -> None:
    tensors, meta = method.state()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(workdir / STATE_TENSORS))
    (workdir / STATE_META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def previous_state_rel(ctx: StageContext, task: int, stage: str) -> Optional[str]:
    """Where the latest stream state before (task, stage) lives, or None at the stream's start."""
    order = [(t, s) for t in range(task + 1) for s in STAGES]
    for t, s in reversed(order[: order.index((task, stage))]):
        rel = ctx.ledger.rel(t, s)
        if ctx.storage.exists(f"{rel}/{STATE_TENSORS}"):
            return rel
    return None


def restore(ctx: StageContext, task: int, stage: str, rt: Runtime, scratch: Path) -> tuple[torch.nn.Module, ContinualMethod]:
    """A fresh copy of the base with the method attached and the previous state loaded."""
    seed_everything(ctx.cfg.train.seed, task, stage, "attach")
    model = rt.fresh_model(ctx.cfg.train)
    method = make_method(ctx.cfg)
    method.attach(model)
    rel = previous_state_rel(ctx, task, stage)
    if rel is not None:
        local = ctx.storage.get_dir(rel, scratch / "prev_state")
        meta = json.loads((local / STATE_META).read_text())
        method.load_state(load_file(str(local / STATE_TENSORS)), meta)
    model.eval()
    return model, method


# -- batches ---------------------------------------------------------------------------------
def with_features(batch: Batch, method: ContinualMethod, rt: Runtime, *, for_model: bool = False,
                  cache: Optional[ImageFeatureCache] = None) -> Batch:
    """The batch with the routing features the method needs; ``for_model``: a training batch, whose
    forward then reuses the routing pass of the vision tower (``add_routing_features``), read
    from ``cache`` for the images it holds."""
    from cram_ray.models.features import add_routing_features

    if method.needs_features:
        add_routing_features(batch, method.needs_features, rt.image_encoder, rt.text_encoder, for_model=for_model,
                             cache=cache)
    return batch


def feature_cache(ctx: StageContext, task: int, rt: Runtime) -> ImageFeatureCache:
    """The task's cache of the frozen vision pass (``train.feature_cache_mb``), shared by its probe
    and train stages in this process."""
    return rt.feature_cache((ctx.run_id, task), ctx.cfg.train.feature_cache_mb * 2 ** 20)


def batches_of(records: list[Record], size: int, order: np.ndarray) -> Iterator[list[Record]]:
    for start in range(0, len(order), size):
        yield [records[i] for i in order[start:start + size]]


def train_stream(ctx: StageContext, task: int, rt: Runtime, method: ContinualMethod,
                 records: list[Record], salt: str) -> Iterator[Batch]:
    """Endless shuffled training batches of one task, reshuffled every epoch."""
    bs = min(ctx.cfg.train.batch_size, len(records))
    cache = feature_cache(ctx, task, rt)

    def epoch(e: int):
        order = epoch_order(ctx.cfg.train.seed, task, e, len(records), bs, salt)  # the Ray executor's order too
        for recs in batches_of(records, bs, order):
            yield with_features(rt.vlm.processor.train_batch(recs, [task] * len(recs)), method, rt, for_model=True,
                                cache=cache)

    return cycle(epoch)


def task_log(ctx: StageContext, task: int) -> Callable[[str], None]:
    """Print one line under the task's ``[task t/T name]`` prefix."""
    prefix = task_prefix(task, len(ctx.tasks), ctx.tasks[task].name)

    def log(msg: str) -> None:
        print(prefix + msg, flush=True)
    return log


# -- the stages ------------------------------------------------------------------------------
# A "fit" runs n optimizer steps of the method over batches: the in-process executor uses plain
# torch (fit_steps); the Ray Train worker passes one that drives a DeepSpeed engine. The stage
# bodies below (run_probe / run_allocate / run_train) are shared by both.
Fit = Callable[..., dict[str, float]]


def local_fit(ctx: StageContext, task: int, stage: str) -> Fit:
    def fit(model, method, batches, steps, observe=None, reporter=None):
        return fit_steps(
            model, method, batches, steps, lr=ctx.cfg.train.lr, warmup_ratio=ctx.cfg.train.warmup_ratio,
            weight_decay=ctx.cfg.train.weight_decay, observe=observe, log=task_log(ctx, task), reporter=reporter,
            grad_accum=ctx.cfg.train.grad_accum,
        )
    return fit


def run_probe(ctx: StageContext, task: int, model, method: ContinualMethod, batches: Iterator[Batch],
              fit: Fit) -> dict[str, Any]:
    method.begin_task(ctx.info(task))
    steps = method.probe_steps(ctx.cfg.train.steps_per_task)
    report: dict[str, Any] = {"steps": steps}
    if steps:
        seed_everything(ctx.cfg.train.seed, task, "probe")
        method.begin_probe()
        reporter = StepProgress("probe", steps, log=task_log(ctx, task))
        report["loss"] = fit(model, method, batches, steps, observe=lambda b: method.observe(b, "probe"),
                             reporter=reporter)
        report["curve"] = reporter.close()
    report.update(method.end_probe())
    return report


def run_allocate(ctx: StageContext, task: int, method: ContinualMethod) -> dict[str, Any]:
    seed_everything(ctx.cfg.train.seed, task, "allocate")
    return method.allocate()


def train_steps_for(ctx: StageContext, method: ContinualMethod) -> int:
    return ctx.cfg.train.steps_per_task - method.probe_steps(ctx.cfg.train.steps_per_task)


def run_train(ctx: StageContext, task: int, model, method: ContinualMethod, batches: Iterator[Batch],
              fit: Fit) -> dict[str, Any]:
    seed_everything(ctx.cfg.train.seed, task, "train")
    method.begin_train()
    steps = train_steps_for(ctx, method)
    reporter = StepProgress("train", steps, log=task_log(ctx, task))
    loss = fit(model, method, batches, steps, reporter=reporter)
    return {"steps": steps, "loss": loss, "curve": reporter.close()}


def stage_probe(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "probe", rt, workdir.parent)
    records = task_records(ctx, task, "train", workdir.parent)
    startup = time.time() - t0
    batches = train_stream(ctx, task, rt, method, records, "probe")
    report = run_probe(ctx, task, model, method, batches, local_fit(ctx, task, "probe"))
    save_state(method, workdir)
    return StageResult("probe", task, report, time.time() - t0, startup)


def stage_allocate(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "allocate", rt, workdir.parent)
    startup = time.time() - t0
    report = run_allocate(ctx, task, method)
    save_state(method, workdir)
    return StageResult("allocate", task, report, time.time() - t0, startup)


def stage_train(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "train", rt, workdir.parent)
    records = task_records(ctx, task, "train", workdir.parent)
    startup = time.time() - t0
    batches = train_stream(ctx, task, rt, method, records, "train")
    report = run_train(ctx, task, model, method, batches, local_fit(ctx, task, "train"))
    save_state(method, workdir)
    return StageResult("train", task, report, time.time() - t0, startup)


def stage_aggregate(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "aggregate", rt, workdir.parent)
    records = task_records(ctx, task, "train", workdir.parent)
    startup = time.time() - t0
    if method.needs_features:
        bs = ctx.cfg.train.eval_batch_size
        with torch.no_grad():
            for recs in batches_of(records, bs, np.arange(len(records))):
                batch = with_features(rt.vlm.processor.train_batch(recs, [task] * len(recs)), method, rt)
                method.observe(batch, "aggregate")
    report = method.end_task()
    report["params_added"] = method.params_added()
    report["ranks"] = method.ranks()
    save_state(method, workdir)
    return StageResult("aggregate", task, report, time.time() - t0, startup)


def answer_records(rt: Runtime, model: torch.nn.Module, method: ContinualMethod, records: list[Record],
                   task_index: list[int], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers for one batch of records under the method's task-agnostic routing.

    The one answering path of the evaluation stage (both executors), workflows/predict.py and the
    Serve deployment, so all three give the same answer to the same record. ``task_index`` is each
    record's stream index (only a method with ``needs_task_id`` reads it). Returns per record
    ``{"prediction": str}`` plus the method's routing decision (:meth:`ContinualMethod.routing_decisions`).
    """
    from dataclasses import replace

    batch = with_features(rt.vlm.processor.prompt_batch(records, task_index), method, rt)
    device = next(model.parameters()).device
    if device.type != "cpu":
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        method.route(batch, training=False)
        preds = replace(rt.vlm, model=model).generate(batch, max_new_tokens)
    routes = method.routing_decisions() or [{} for _ in records]
    return [{"prediction": pred, **route} for pred, route in zip(preds, routes)]


def scored_rows(records: list[Record], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation's predictions.jsonl rows: the answer scored against the record's, and the
    routed task when the method routes."""
    from cram_ray.eval.scorers import score

    rows = []
    for rec, ans in zip(records, answers):
        row = {"id": rec.id, "task": rec.task, "prediction": ans["prediction"], "answer": rec.answer,
               "score": score(rec.metric, ans["prediction"], rec.reference)}
        if "routed_task" in ans:
            row["routed_task"] = ans["routed_task"]
        rows.append(row)
    return rows


def evaluate_task(ctx: StageContext, rt: Runtime, model: torch.nn.Module, method: ContinualMethod,
                  i: int, records: list[Record]) -> tuple[list[dict[str, Any]], list[int]]:
    """Greedy answers for the test records of task ``i``; returns predictions and routed tasks."""
    rows: list[dict[str, Any]] = []
    for recs in batches_of(records, ctx.cfg.train.eval_batch_size, np.arange(len(records))):
        rows += evaluate_batch(ctx, rt, model, method, i, recs)
    return rows, [r["routed_task"] for r in rows if "routed_task" in r]


def evaluate_batch(ctx: StageContext, rt: Runtime, model: torch.nn.Module, method: ContinualMethod, i: int,
                   records: list[Record]) -> list[dict[str, Any]]:
    """One batch of task ``i``'s test records answered and scored: its predictions.jsonl rows (the
    in-process stage, the Ray Data actors and the warm Train-run evaluation all go through here)."""
    return scored_rows(records, answer_records(rt, model, method, records, [i] * len(records),
                                               ctx.cfg.data.max_answer_len))


def stage_evaluate(ctx: StageContext, task: int, workdir: Path) -> StageResult:
    t0 = time.time()
    rt = runtime(ctx)
    model, method = restore(ctx, task, "evaluate", rt, workdir.parent)
    startup = time.time() - t0
    seed_everything(ctx.cfg.train.seed, task, "evaluate")
    row: list[float] = []
    confusion: list[list[int]] = []
    with open(workdir / "predictions.jsonl", "w") as fh:
        for i in range(task + 1):
            rows, routed = evaluate_task(ctx, rt, model, method, i, task_records(ctx, i, "test", workdir.parent))
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            row.append(100.0 * float(np.mean([r["score"] for r in rows])))
            if routed:
                confusion.append([routed.count(j) for j in range(task + 1)])
    report: dict[str, Any] = {"row": row}
    if confusion:
        report["confusion"] = confusion
        report["routing_accuracy"] = 100.0 * sum(confusion[i][i] for i in range(len(confusion))) / max(
            1, sum(map(sum, confusion)))
    return StageResult("evaluate", task, report, time.time() - t0, startup)


STAGE_FUNCS: dict[str, Callable[[StageContext, int, Path], StageResult]] = {
    "probe": stage_probe,
    "allocate": stage_allocate,
    "train": stage_train,
    "aggregate": stage_aggregate,
    "evaluate": stage_evaluate,
}
