"""The Ray executor: every stage of the stream on a Ray cluster, with the in-process stages' outputs.

* probe, allocate, train and, with ``train.fuse_eval`` (the default), aggregate and evaluate — ONE
  Ray Train run per task (cram_ray/train/trainer.py): starting a TorchTrainer costs ~20 s here and
  an actor pool for a Ray Data stage ~15 s, more than the stages compute on small models, so a
  task's stages share one run's warm workers (``fuse=True``). The run commits each sub-stage's
  outputs and marker as it finishes them, so ``run(ctx, t, "probe")`` launches the run and returns
  the probe's result, and the driver's following calls return what the same run already committed.
  With ``fuse=False`` probe and train are separate Train runs and allocate a CPU task.
* aggregate, evaluate run on their own (``train.fuse_eval: false``, or a resumed run that finds
  train done but not them) — Ray Data batch inference (``map_batches`` on an actor pool,
  cram_ray/pipeline/ray_data_stages.py), coordinated by a Ray task.
* every coordinating task is ``@ray.remote(max_retries=train.stage_retries, retry_exceptions=True)``;
  stage outputs are idempotent (written to a scratch directory, committed with a marker last).

The driver runs a stage only when its marker does not verify, and invalidates the marker first.
A sub-stage this executor's fused run committed in the current session is still valid (its inputs
were produced by the same run, in order): its marker, deleted by the driver, is written back as
it was. Launching a fused run invalidates the markers of the sub-stages after the requested one,
which depend on it, so a rerun never reuses a stale allocation, expert or evaluation.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import torch

from cram_ray.config import StreamConfig
from cram_ray.pipeline.context import StageContext
from cram_ray.pipeline.ledger import MARKER, StageResult
from cram_ray.pipeline.ray_cluster import connect

TRAIN_RUN = ("probe", "allocate", "train")
WARM = ("aggregate", "evaluate")  # joined to the Train run with train.fuse_eval


def _commit_stage(ctx: StageContext, task: int, stage: str, func: Callable[[StageContext, int, Path], StageResult]) -> StageResult:
    scratch = Path(tempfile.mkdtemp(prefix=f"cram-{stage}-{task}-"))
    try:
        workdir = scratch / "out"
        workdir.mkdir()
        result = func(ctx, task, workdir)
        ctx.ledger.commit(result, workdir)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stage_task(ctx_json: dict[str, Any], task: int, stage: str, on_ray_data: bool, threads: int) -> dict[str, Any]:
    """Body of the remote stage tasks: a Ray Data stage, or the in-process stage function.

    ``threads``: the driver's intra-op thread count. Float reductions (a method's covariance,
    its shrinkage and width estimates in ``end_task``) depend on it in the last bits; using the
    driver's makes the Ray stages' reports equal the in-process ones exactly.
    """
    import torch

    torch.set_num_threads(threads)
    ctx = StageContext.from_json(ctx_json)
    if on_ray_data:
        from cram_ray.pipeline.ray_data_stages import stage_aggregate_ray, stage_evaluate_ray

        func = {"aggregate": stage_aggregate_ray, "evaluate": stage_evaluate_ray}[stage]
        return _commit_stage(ctx, task, stage, func).to_json()
    from cram_ray.pipeline.driver import execute_stage

    return execute_stage(ctx, task, stage).to_json()


def _fused_task(ctx_json: dict[str, Any], task: int, stages: list[str], source: str, threads: int) -> dict[str, Any]:
    """A task's fused Train run, launched from a plain task (see RayExecutor._train_run)."""
    from cram_ray.train.trainer import run_fused

    return run_fused(StageContext.from_json(ctx_json), task, stages, source, threads)


def _processor_source(ctx_json: dict[str, Any]) -> str:
    """What Ray Data tasks need to tokenise: the compact processor's JSON, or the context to load a
    checkpoint's processor. Building the runtime here also trains/caches the tiny base once."""
    from cram_ray.pipeline.context import runtime

    ctx = StageContext.from_json(ctx_json)
    processor = runtime(ctx).vlm.processor
    try:
        return json.dumps({"settings": processor.settings()}, sort_keys=True)
    except TypeError:
        return json.dumps({"ctx": ctx_json}, sort_keys=True)


class RayExecutor:
    """Runs ``(task, stage)`` on Ray and commits its outputs and marker (see the module docstring)."""

    name = "ray"

    def __init__(self, cfg: StreamConfig, *, fuse: bool = True, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.fuse = fuse
        self.log = log
        self.mode: Optional[str] = None
        self._source: Optional[str] = None
        self._fresh: dict[tuple[int, str], bytes] = {}  # markers committed by fused runs of this session
        self._ahead: dict[int, Future] = {}  # task -> its training dataset, being built
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cram-data-ahead")
        self.timings: list[dict[str, Any]] = []  # one entry per Train run: wall, build, worker timings

    # -- plumbing --------------------------------------------------------------------------
    def _connect(self) -> None:
        if self.mode is None:
            self.mode = connect(self.cfg.train, self.log)

    def _remote(self, fn: Callable, *, num_cpus: float):
        retries = self.cfg.train.stage_retries
        # "DEFAULT" schedules on the cluster, never inside a caller's placement group: a stream run as a
        # Tune trial would otherwise have to reserve every stage task's CPU in the trial's bundles
        return ray.remote(num_cpus=num_cpus, max_retries=retries, retry_exceptions=True,
                          scheduling_strategy="DEFAULT")(fn)

    def source(self, ctx: StageContext) -> str:
        if self._source is None:
            self._source = ray.get(self._remote(_processor_source, num_cpus=1).remote(ctx.to_json()))
        return self._source

    # -- the executor protocol -------------------------------------------------------------
    def run(self, ctx: StageContext, task: int, stage: str) -> StageResult:
        self._connect()
        restored = self._restore_marker(ctx, task, stage)
        if restored is not None:
            return restored
        if stage in ("probe", "train") or (stage == "allocate" and self.fuse):
            return self._train_run(ctx, task, stage)
        on_ray_data = stage in ("aggregate", "evaluate")
        # a Ray Data coordinator mostly waits on its actor pool: it takes no CPU slot of its own
        fn = self._remote(_stage_task, num_cpus=0 if on_ray_data else 1)
        threads = torch.get_num_threads()
        t0 = time.time()
        result = StageResult.from_json(ray.get(fn.remote(ctx.to_json(), task, stage, on_ray_data, threads)))
        # the difference to the stage's own seconds is scheduling, process start and the commit
        self.log(f"[ray] task {task} {stage}: {time.time() - t0:.1f}s on the driver, the stage timed "
                 f"{result.seconds:.1f}s of which {result.startup_seconds:.1f}s start-up")
        return result

    def _train_run(self, ctx: StageContext, task: int, stage: str) -> StageResult:
        from cram_ray.train.trainer import run_fused

        ledger = ctx.ledger
        fused = TRAIN_RUN + WARM if self.cfg.train.fuse_eval else TRAIN_RUN
        stages = list(fused[fused.index(stage):]) if self.fuse else [stage]
        for later in stages[1:]:
            ledger.invalidate(task, later)
        source = self.source(ctx)
        self.log(f"[ray] task {task}: Train run for {' -> '.join(stages)}")
        waited = 0.0
        if ray.util.get_current_placement_group() is None:
            t0 = time.time()
            dataset = self._dataset(ctx, task)
            waited = time.time() - t0
            self._read_ahead(ctx, task + 1, source)
            timing = run_fused(ctx, task, stages, source, torch.get_num_threads(), dataset)
        else:
            # The driver runs inside a placement group that captures child tasks (a Tune trial): a
            # TorchTrainer started here would inherit that capture down to its workers, whose Ray
            # Data tasks would then be forced into a worker's own one-CPU bundle. Start it from a
            # plain task scheduled on the cluster, as a standalone driver would.
            remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(_fused_task)
            timing = ray.get(remote.remote(ctx.to_json(), task, stages, source, torch.get_num_threads()))
        timing.update({"task": task, "stages": stages, "data_wait": waited})
        self.timings.append(timing)
        markers = {s: ledger.marker(task, s) for s in stages}
        in_stages = sum(float(m["result"]["seconds"]) for m in markers.values() if m is not None)
        # what is neither the data set-up nor a stage (whose first includes the worker's start) is the
        # TorchTrainer's own: controller, placement group, worker processes, process group, teardown
        self.log(f"[ray] task {task}: waited {waited:.1f}s for the data read ahead; Train run finished in "
                 f"{timing['wall']:.1f}s: {timing['build']:.1f}s building its dataset and trainer, {in_stages:.1f}s "
                 f"in its stages, {timing['wall'] - timing['build'] - in_stages:.1f}s TorchTrainer set-up and teardown")
        for s in stages[1:]:
            if markers[s] is not None:
                self._fresh[(task, s)] = ledger.storage.read_bytes(f"{ledger.rel(task, s)}/{MARKER}")
        result = ledger.verify(task, stage)
        if result is None:
            raise RuntimeError(f"task {task}: the Train run ended without committing {stage}")
        return result

    def _read_ahead(self, ctx: StageContext, task: int, source: str) -> None:
        """Start building ``task``'s training dataset. A Train run of one worker keeps one core busy;
        reading and decoding the next task's data on another takes that off the next run's start."""
        from cram_ray.train.trainer import stream_dataset

        if self.cfg.train.ingest == "stream" and task < len(ctx.tasks) and task not in self._ahead:
            self._ahead[task] = self._reader.submit(stream_dataset, ctx, task, source)

    def _dataset(self, ctx: StageContext, task: int) -> Any:
        """The dataset built ahead for ``task``, or None (the Train run then builds it)."""
        future = self._ahead.pop(task, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception as err:  # built again, in the Train run's own set-up, where a failure stops it
            self.log(f"[ray] task {task}: reading its data ahead failed ({err!r}); reading it again")
            return None

    def _restore_marker(self, ctx: StageContext, task: int, stage: str) -> Optional[StageResult]:
        """A sub-stage committed by this session's fused run: its marker back in place."""
        blob = self._fresh.pop((task, stage), None)
        if blob is None:
            return None
        ledger = ctx.ledger
        ledger.storage.write_bytes_atomic(f"{ledger.rel(task, stage)}/{MARKER}", blob)
        return ledger.verify(task, stage)

    def startup_report(self) -> dict[str, Any]:
        """Measured costs of the Train runs so far (seconds)."""
        return {"train_runs": self.timings}
