"""The Ray Train worker of a fused run: a task's stages, probe through evaluate, in one TorchTrainer,
and with ``train.run_span: stream`` every later task's stages in the same run.

Every rank runs :func:`train_loop_per_worker`. The runtime (base model, processor, routing encoders)
is built once per worker; each task reads its own dataset shard (``train_<task>``). For each
sub-stage of each task, in order:

1. rank 0 checks the ledger; a sub-stage whose ``_DONE.json`` verifies (committed by an earlier
   attempt of this run) is skipped by every rank (the decision is broadcast, so ranks agree);
2. every rank restores the model and method exactly as ``stages.restore`` does for that stage
   (fresh base copy, adapters attached, the previous stage's state loaded from storage);
3. the stage body is the in-process one (``stages.run_probe`` / ``run_allocate`` / ``run_train``),
   given a DeepSpeed-driven ``fit`` (cram_ray/train/fit.py) and this rank's batches from the
   Ray Data shard (``ray.train.get_dataset_shard("train")``, drawn as cram_ray/train/ingest.py says);
   aggregate and evaluate (``train.fuse_eval``) split their batches over the ranks and reduce on
   rank 0 (cram_ray/train/warm_eval.py);
4. rank 0 saves the state (safetensors + JSON) and commits it, or evaluate's predictions, with its
   marker through ``Ledger.commit``, then all ranks meet at a barrier before the next sub-stage
   restores it.

Inside probe and train, every ``train.checkpoint_every`` steps all ranks save a checkpoint
(gathering ZeRO's partitioned optimizer state is a collective) and report it with
``ray.train.report``. After a worker failure, Ray Train restarts the group (an elastic group with
the workers that still fit); the new attempt skips committed sub-stages and resumes the interrupted
one from ``ray.train.get_checkpoint()`` when the checkpoint's task, sub-stage and inputs (the
checksums of the state it started from) match, at any world size: the checkpoint holds whole tensors, and
every rank's rows of a step are its slots of the same global batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.pipeline.context import StageContext, runtime
from cram_ray.pipeline.ledger import StageResult
from cram_ray.train.fit import FitProgress, Stepper, engine_fit
from cram_ray.train.ingest import ShardStream, StreamPlan, collate_train, merge_collated
from cram_ray.train.progress import task_prefix
from cram_ray.train.warm_eval import aggregate_on_workers, evaluate_on_workers

STATELESS = ("evaluate",)  # sub-stages whose outputs are reports and predictions, not a new state
FIT_PHASES = {"probe": 0, "train": 1}  # sub-stage -> phase index of the StreamPlan
CKPT_META = "fused.json"
FAULT_KEY = "fault"  # train_loop_config key: {"stage", "step", "rank", "flag"}: crash once (tests)


# -- the data of this rank -------------------------------------------------------------------
class RowStream:
    """This rank's encoded rows of the exact ingest, one micro-batch at a time, addressed by (phase, step).

    A background thread pulls from Ray Data from construction on, so the pipeline's start (its
    tasks' processes import torch and the processor) overlaps the worker's own model loading.
    """

    _END = object()

    def __init__(self, micro_batches: Iterable[dict[str, np.ndarray]], prefetch: int = 16) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._head: Optional[dict[str, np.ndarray]] = None
        self._done = False
        self._thread = threading.Thread(target=self._pull, args=(micro_batches,), daemon=True, name="row-stream")
        self._thread.start()

    def _pull(self, micro_batches: Iterable[dict[str, np.ndarray]]) -> None:
        try:
            for rows in micro_batches:
                self._queue.put(rows)
            self._queue.put(self._END)
        except BaseException as err:  # surfaced in the training thread
            self._queue.put(err)

    def _peek(self) -> Optional[dict[str, np.ndarray]]:
        if self._head is None and not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise RuntimeError("reading the training data failed") from item
            if item is self._END:
                self._done = True
            else:
                self._head = item
        return self._head

    def take(self, phase: int, step: int) -> list[dict[str, np.ndarray]]:
        """The micro-batches of ``(phase, step)``; earlier rows (already trained on) are skipped."""
        out = []
        while True:
            rows = self._peek()
            if rows is None:
                break
            key = (int(rows["phase"][0]), int(rows["step"][0]))
            if int(rows["phase"][-1]) != key[0] or int(rows["step"][-1]) != key[1]:
                raise RuntimeError(f"a micro-batch straddles two steps: {key} .. "
                                   f"{(int(rows['phase'][-1]), int(rows['step'][-1]))}")
            if key > (phase, step):
                break
            self._head = None
            if key == (phase, step):
                out.append(rows)
        if not out:
            raise RuntimeError(f"the data stream has no rows for phase {phase} step {step}")
        return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class PhaseBatches:
    """The batches one sub-stage's ``fit`` consumes: this rank's share of every step's batch.

    In a shared phase (the probe with several ranks) the rank holds the whole global batch: it
    trains on its own share and ``observer`` sees the whole batch, as in the in-process loop.
    """

    def __init__(self, stream: Any, phase: int, *, rank: int, shared: bool, start: int,
                 collate: Callable[[Any], Batch], features: Callable[[Batch], Batch],
                 merge: Optional[Callable[[list[Any]], Batch]] = None) -> None:
        self.stream, self.phase, self.rank, self.shared = stream, phase, rank, shared
        self.step = start
        self.collate, self.features = collate, features
        # the whole global batch of a shared step, from every rank's part
        self.merge = merge or (lambda parts: collate(_concat(parts)))
        self.observer: Optional[Callable[[Batch], None]] = None
        self.wait = 0.0  # seconds spent waiting for Ray Data
        self.prepare = 0.0  # seconds spent padding and computing routing features
        self.checkpoints, self.checkpoint_seconds = 0, 0.0  # Train checkpoints saved and reported, and their time
        self.setup: dict[str, float] = {}  # engine_fit's set-up seconds (the first DeepSpeed engine builds its ops)

    def __iter__(self) -> "PhaseBatches":
        return self

    def __next__(self) -> Batch:
        t0 = time.time()
        parts = self.stream.take(self.phase, self.step)
        t1 = time.time()
        self.wait += t1 - t0
        self.step += 1
        try:
            return self._prepare(parts)
        finally:
            self.prepare += time.time() - t1

    def _prepare(self, parts: list[dict[str, np.ndarray]]) -> Batch:
        if self.shared:
            if self.observer is not None:
                with torch.no_grad():
                    self.observer(self.features(self.merge(parts)))
            return self.features(self.collate(parts[self.rank]))
        if len(parts) != 1:
            raise RuntimeError(f"expected one micro-batch per step, got {len(parts)}")
        batch = self.features(self.collate(parts[0]))
        if self.observer is not None:  # the batch it trains on, as fit_steps observes it
            with torch.no_grad():
                self.observer(batch)
        return batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors of a batch on the worker's device (routing features are computed on CPU first)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- ranks agree -----------------------------------------------------------------------------
def broadcast_json(value: Any) -> Any:
    """Rank 0's JSON-able ``value`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [json.dumps(value) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return json.loads(box[0])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def input_fingerprint(ctx: StageContext, task: int, stage: str) -> Optional[str]:
    """Checksums of the state a sub-stage starts from: a checkpoint is only resumed on the same inputs."""
    from cram_ray.pipeline.stages import previous_state_rel

    rel = previous_state_rel(ctx, task, stage)
    if rel is None:
        return None
    marker = ctx.storage.read_bytes(f"{rel}/_DONE.json") if ctx.storage.exists(f"{rel}/_DONE.json") else b""
    files = json.loads(marker).get("files", {}) if marker else {}
    return hashlib.sha256(json.dumps([rel, files], sort_keys=True).encode()).hexdigest()


# -- the loop --------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a fused run (see the module docstring). ``config`` is JSON-able:
    ``units``, each a task, its stages and its data plan, in order."""
    import ray.train
    import ray.train.torch

    from cram_ray.train.trainer import dataset_name

    t_start = time.time()
    ctx = StageContext.from_json(config["ctx"])
    train_ctx = ray.train.get_context()
    rank, world_size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rt = runtime(ctx)
    device = ray.train.torch.get_device() if ctx.cfg.train.use_gpu else torch.device("cpu")
    resume = _resume_point(ray.train.get_checkpoint())
    startup = time.time() - t_start
    first = config["units"][0]
    _logger(ctx, int(first["task"]), rank)(f" worker {rank}/{world_size} ready in {startup:.1f}s "
                                           f"(resume: {resume and resume['meta']})")
    timings: dict[str, float] = {"worker_startup": startup}
    unclaimed = startup  # the worker's start, counted in the first stage this run computes
    for unit in config["units"]:
        task = int(unit["task"])
        shard = ray.train.get_dataset_shard(dataset_name(task))
        unclaimed = _run_unit(ctx, task, list(unit["stages"]), StreamPlan.from_json(unit["plan"]), shard, rt,
                              device, resume, rank, world_size, config, timings, unclaimed)
    if resume:
        shutil.rmtree(resume["local"], ignore_errors=True)
    ray.train.report({"done": 1.0, **{f"seconds_{k}": v for k, v in timings.items()}})


def _run_unit(ctx: StageContext, task: int, stages: list[str], plan: StreamPlan, shard: Any, rt: Any,
              device: torch.device, resume: Optional[dict[str, Any]], rank: int, world_size: int,
              config: dict[str, Any], timings: dict[str, float], startup: float) -> float:
    """One task's stages of the run, each restored, run and committed in order. ``startup``: the
    worker's own start, not yet counted in a stage: the first stage computed here counts it.
    Returns what is left of it (0 once a stage ran)."""
    from cram_ray.pipeline.stages import (feature_cache, restore, run_allocate, run_probe, run_train, save_state,
                                          with_features)

    if world_size > plan.world_size:
        raise RuntimeError(f"the data was planned for at most {plan.world_size} workers, the run has {world_size}")
    processor = rt.vlm.processor
    pixel_dtype = next(rt.vlm.model.parameters()).dtype
    if plan.mode == "exact":
        stream: Any = RowStream(shard.iter_batches(batch_size=plan.micro(world_size), batch_format="numpy",
                                                   prefetch_batches=2))
        collate, merge = (lambda rows: collate_train(rows, pad_id=processor.text.pad_id, pixel_dtype=pixel_dtype)), None
    else:
        stream = ShardStream(shard, plan, rank, pad_id=processor.text.pad_id, pixel_dtype=pixel_dtype,
                             world_size=world_size)
        collate, merge = (lambda batch: batch), (lambda parts: merge_collated(parts, pad_id=processor.text.pad_id))
    log = _logger(ctx, task, rank)
    fault = config.get(FAULT_KEY)
    if fault is not None and int(fault.get("task", task)) != task:
        fault = None
    for stage in stages:
        done = broadcast_json(ctx.ledger.verify(task, stage) is not None if rank == 0 else None)
        if done:
            log(f" {stage}: committed by an earlier attempt, skipped")
            continue
        t0 = time.time()
        scratch = Path(tempfile.mkdtemp(prefix=f"cram-fused-{task}-{stage}-"))
        try:
            model, method = restore(ctx, task, stage, rt, scratch)
            t_restored = time.time()
            waited = 0.0  # for data and for the engine's set-up: not compute
            workdir = scratch / "out"
            workdir.mkdir()
            if stage == "allocate":
                report = run_allocate(ctx, task, method)
            elif stage == "aggregate":
                report = aggregate_on_workers(ctx, task, rt, method, rank=rank, world_size=world_size,
                                              threads=int(config["threads"]))
            elif stage == "evaluate":
                report = evaluate_on_workers(ctx, task, rt, model, method, rank=rank, world_size=world_size,
                                             device=device, workdir=workdir,
                                             before_batch=lambda k: _maybe_crash(fault, "evaluate", k, rank))
            else:
                phase = FIT_PHASES[stage]
                fingerprint = input_fingerprint(ctx, task, stage)
                start_dir, start_step = None, 0
                # the probe restarts from its first step: its observed statistics live outside the checkpoint
                if (resume and stage == "train" and resume["meta"]["stage"] == stage
                        and int(resume["meta"]["task"]) == task and resume["meta"]["inputs"] == fingerprint):
                    start_dir, start_step = resume["dir"], int(resume["meta"]["step"])
                    log(f" {stage}: resuming at step {start_step} from {resume['path']}")
                cache = feature_cache(ctx, task, rt)
                seen_before = (cache.hits, cache.misses)
                batches = PhaseBatches(
                    stream, phase, rank=rank, shared=plan.phases[phase].shared, start=start_step,
                    collate=collate, merge=merge,
                    features=lambda b, m=method, c=cache: to_device(with_features(b, m, rt, for_model=True, cache=c),
                                                                    device),
                )
                fit = _ray_fit(ctx, task, stage, rank, fingerprint, batches, start_dir, fault, log)
                body = run_probe if stage == "probe" else run_train
                report = body(ctx, task, model, method, batches, fit)
                engine_setup = batches.setup.get("engine_setup", 0.0)
                waited = batches.wait + engine_setup
                timings[f"task{task}_{stage}_data_wait"] = batches.wait
                timings[f"task{task}_{stage}_engine_setup"] = engine_setup
                timings[f"task{task}_{stage}_batch_prep"] = batches.prepare
                hits, misses = cache.hits - seen_before[0], cache.misses - seen_before[1]
                cached = f" ({100 * hits / (hits + misses):.0f}% of images from the feature cache)" if hits + misses else ""
                log(f" {stage}: waited {batches.wait:.1f}s for data, {batches.prepare:.1f}s padding + features{cached}, "
                    f"{batches.checkpoint_seconds:.1f}s in {batches.checkpoints} checkpoint(s)")
            seconds = time.time() - t0
            timings[f"task{task}_{stage}"] = seconds
            if rank == 0:
                if stage not in STATELESS:
                    save_state(method, workdir)
                # the worker's own start (runtime, data) counts in the first stage it computes
                idle = (t_restored - t0) + waited
                result = StageResult(stage, task, report, seconds + startup, idle + startup)
                ctx.ledger.commit(result, workdir)
                log(f" {stage}: committed in {seconds:.1f}s")
            startup = 0.0
            barrier()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return startup


def _resume_point(checkpoint: Any) -> Optional[dict[str, Any]]:
    """The latest Train checkpoint as a local directory plus its JSON, or None."""
    if checkpoint is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="cram-resume-"))
    path = Path(checkpoint.to_directory(str(local)))
    meta_file = path / CKPT_META
    if not meta_file.is_file():
        shutil.rmtree(local, ignore_errors=True)
        return None
    return {"dir": path, "local": local, "meta": json.loads(meta_file.read_text()), "path": checkpoint.path}


def _logger(ctx: StageContext, task: int, rank: int) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if rank == 0:
            print(f"{task_prefix(task, len(ctx.tasks), ctx.tasks[task].name)} Train run:{msg}", flush=True)
    return log


def _ray_fit(ctx: StageContext, task: int, stage: str, rank: int, fingerprint: Optional[str],
             batches: PhaseBatches, start_dir: Optional[Path], fault: Optional[dict[str, Any]],
             log: Callable[[str], None]):
    """The ``fit`` the stage bodies call: engine_fit with Train checkpoints every K steps."""
    import ray.train

    every = max(1, ctx.cfg.train.checkpoint_every)

    def checkpoint(stepper: Stepper, progress: FitProgress) -> None:
        if progress.step % every == 0 and progress.step < progress.steps:
            t0 = time.time()
            with tempfile.TemporaryDirectory(prefix="cram-ckpt-") as tmp:
                stepper.save(Path(tmp), progress)  # every rank: gathering ZeRO's state is a collective
                if rank == 0:
                    meta = {"task": task, "stage": stage, "step": progress.step, "inputs": fingerprint}
                    (Path(tmp) / CKPT_META).write_text(json.dumps(meta))
                ray.train.report({"task": task, "phase": FIT_PHASES[stage], "step": progress.step,
                                  **{k: v / max(1, progress.count) for k, v in progress.totals.items()}},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"{stage}-step{progress.step:06d}")
            batches.checkpoints += 1
            batches.checkpoint_seconds += time.time() - t0
        _maybe_crash(fault, stage, progress.step, rank)

    def fit(model, method: ContinualMethod, it, steps: int, observe=None, reporter=None) -> dict[str, float]:
        if it is batches:
            batches.observer = observe
            observe = None
        return engine_fit(model, method, it, steps, ctx.cfg.train, dtype=ctx.cfg.model.dtype, observe=observe,
                          log=log, resume=start_dir, checkpoint=checkpoint, reporter=reporter, timings=batches.setup)

    return fit


def _maybe_crash(fault: Optional[dict[str, Any]], stage: str, step: int, rank: int) -> None:
    """Test hook: kill this worker process hard once, at a given (stage, step, rank)."""
    if not fault or fault["stage"] != stage or int(fault["step"]) != step or int(fault["rank"]) != rank:
        return
    flag = Path(fault["flag"])
    if flag.exists():
        return
    flag.write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
    print(f"[fault] killing worker rank {rank} (pid {os.getpid()}) at {stage} step {step}", flush=True)
    os._exit(1)
