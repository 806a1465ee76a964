"""The Ray executor: every stage of the stream on a Ray cluster, with the in-process stages' outputs.

* probe, allocate, train and, with ``train.fuse_eval`` (the default), aggregate and evaluate — in a
  Ray Train run (cram_ray/train/trainer.py): starting a TorchTrainer costs 15-40 s here and an actor
  pool for a Ray Data stage ~15 s, more than the stages compute on small models, so stages share one
  run's warm workers (``fuse=True``). With ``train.run_span: stream`` (the default) the run launched at
  a task also holds every later task, so workers, their runtime and DeepSpeed are started once per
  stream; ``task`` launches one run per task. The run commits each sub-stage's outputs and marker as it
  finishes it; the run works in the background while ``run(ctx, t, stage)`` waits for that stage's
  marker and returns its result, so the driver reports each task (MLflow, Tune) as soon as it is
  evaluated. With ``fuse=False`` probe and train are separate Train runs and allocate a CPU task.
* aggregate, evaluate run on their own (``train.fuse_eval: false``, or a resumed run that finds
  train done but not them) — Ray Data batch inference (``map_batches`` on an actor pool,
  cram_ray/pipeline/ray_data_stages.py), coordinated by a Ray task.
* every coordinating task is ``@ray.remote(max_retries=train.stage_retries, retry_exceptions=True)``;
  stage outputs are idempotent (written to a scratch directory, committed with a marker last).

The driver runs a stage only when its marker does not verify, and asks the executor to invalidate
it first. Launching a Train run invalidates the markers of every stage it holds (they depend on the
one it starts at), so a rerun never reuses a stale allocation, expert or evaluation; after that, the
stages a running Train run holds are its to commit, and the driver's invalidation leaves them alone.
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
from cram_ray.pipeline.ledger import StageResult
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


def _fused_task(ctx_json: dict[str, Any], units: list[list[Any]], source: str, threads: int,
                name: Optional[str]) -> dict[str, Any]:
    """A fused Train run, launched from a plain task (see RayExecutor._launch)."""
    from cram_ray.train.trainer import run_fused

    return run_fused(StageContext.from_json(ctx_json), [(int(t), list(st)) for t, st in units], source, threads,
                     name=name)


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


class _TrainRun:
    """A fused Train run the executor launched: the stages it will commit, and its outcome."""

    def __init__(self, units: list[tuple[int, list[str]]], future: Future, timing: dict[str, Any]) -> None:
        self.pending = {(t, s) for t, stages in units for s in stages}  # not yet handed to the driver
        self.future = future
        self.timing = timing  # what the driver measured around the run
        self.in_stages = 0.0  # seconds of the stages handed to the driver so far


class RayExecutor:
    """Runs ``(task, stage)`` on Ray and commits its outputs and marker (see the module docstring)."""

    name = "ray"
    POLL = 0.25  # seconds between looks at the ledger while a Train run works

    def __init__(self, cfg: StreamConfig, *, fuse: bool = True, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.fuse = fuse
        self.log = log
        self.mode: Optional[str] = None
        self._source: Optional[str] = None
        self._run: Optional[_TrainRun] = None  # the Train run whose stages the driver is following
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cram-train-run")
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

    def spans_stream(self) -> bool:
        """Whether a Train run holds every later task too (train.run_span: stream, where it applies)."""
        train = self.cfg.train
        return self.fuse and train.fuse_eval and train.ingest == "stream" and train.run_span == "stream"

    # -- the executor protocol -------------------------------------------------------------
    def invalidate(self, ctx: StageContext, task: int, stage: str) -> None:
        """Delete the stage's marker before it reruns, unless the running Train run is to commit it."""
        if self._run is not None and (task, stage) in self._run.pending:
            return
        ctx.ledger.invalidate(task, stage)

    def run(self, ctx: StageContext, task: int, stage: str) -> StageResult:
        self._connect()
        if self._run is not None and (task, stage) in self._run.pending:
            return self._follow(ctx, task, stage)
        if stage in ("probe", "train") or (stage == "allocate" and self.fuse):
            self._launch(ctx, task, stage)
            return self._follow(ctx, task, stage)
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

    def _units(self, ctx: StageContext, task: int, stage: str) -> list[tuple[int, list[str]]]:
        """What a Train run launched at ``(task, stage)`` holds."""
        fused = TRAIN_RUN + WARM if self.cfg.train.fuse_eval else TRAIN_RUN
        first = list(fused[fused.index(stage):]) if self.fuse else [stage]
        later = range(task + 1, len(ctx.tasks)) if self.spans_stream() and first[-1] == "evaluate" else ()
        return [(task, first)] + [(t, list(fused)) for t in later]

    def _launch(self, ctx: StageContext, task: int, stage: str) -> None:
        """Start a fused Train run at ``(task, stage)`` in the background (after the previous one ended);
        the stages it holds are invalidated first, so a rerun never reuses a stale allocation, expert or
        evaluation."""
        from cram_ray.train.trainer import STREAM_RUN, run_fused

        self._finish()
        ledger = ctx.ledger
        units = self._units(ctx, task, stage)
        for t, stages in units:
            for s in stages:
                if (t, s) != (task, stage):
                    ledger.invalidate(t, s)
        source = self.source(ctx)
        spans = len(units) > 1
        # a stream-spanning run keeps one name, so a rerun of the driver finds its checkpoints
        name = STREAM_RUN if spans else None
        what = " -> ".join(units[0][1]) + (f", then tasks {units[1][0]}-{units[-1][0]}" if spans else "")
        self.log(f"[ray] task {task}: Train run for {what}")
        threads = torch.get_num_threads()
        if ray.util.get_current_placement_group() is None:
            t0 = time.time()
            dataset = self._dataset(ctx, task)
            waited = time.time() - t0
            if not spans:
                self._read_ahead(ctx, task + 1, source)
            built = {task: dataset} if dataset is not None else None
            job = lambda: run_fused(ctx, units, source, threads, built, name)  # noqa: E731
        else:
            # The driver runs inside a placement group that captures child tasks (a Tune trial): a
            # TorchTrainer started here would inherit that capture down to its workers, whose Ray
            # Data tasks would then be forced into a worker's own one-CPU bundle. Start it from a
            # plain task scheduled on the cluster, as a standalone driver would.
            waited = 0.0
            remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(_fused_task)
            ref = remote.remote(ctx.to_json(), [[t, st] for t, st in units], source, threads, name)
            job = lambda: ray.get(ref)  # noqa: E731
        self._run = _TrainRun(units, self._runner.submit(job),
                              {"task": task, "stages": units[0][1], "tasks": [t for t, _ in units], "data_wait": waited})

    def _follow(self, ctx: StageContext, task: int, stage: str) -> StageResult:
        """Wait until the running Train run commits ``(task, stage)``; its result. When it is the run's
        last stage, also wait for the run to end and record its timings."""
        run = self._run
        assert run is not None
        while True:
            done = run.future.done()  # looked at first: a run that ended has committed all it will
            result = ctx.ledger.verify(task, stage)
            if result is not None:
                break
            if done:
                self._run = None
                run.future.result()  # the run's own error, if it failed
                raise RuntimeError(f"task {task}: the Train run ended without committing {stage}")
            time.sleep(self.POLL)
        run.pending.discard((task, stage))
        run.in_stages += result.seconds
        if not run.pending:
            self._finish()
        return result

    def _finish(self) -> None:
        """Wait for the current Train run to end (its error, if any, is raised) and log where its time went."""
        run, self._run = self._run, None
        if run is None:
            return
        timing = {**run.future.result(), **run.timing}
        self.timings.append(timing)
        in_stages = run.in_stages
        tasks = timing["tasks"]
        # what is neither the data set-up nor a stage (whose first includes the worker's start) is the
        # TorchTrainer's own: controller, placement group, worker processes, process group, teardown
        self.log(f"[ray] Train run of task{'s %d-%d' % (tasks[0], tasks[-1]) if len(tasks) > 1 else ' %d' % tasks[0]}: "
                 f"waited {timing['data_wait']:.1f}s for the data read ahead; finished in {timing['wall']:.1f}s: "
                 f"{timing['build']:.1f}s building its datasets and trainer, {in_stages:.1f}s in its stages, "
                 f"{timing['wall'] - timing['build'] - in_stages:.1f}s TorchTrainer set-up and teardown")

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

    def startup_report(self) -> dict[str, Any]:
        """Measured costs of the Train runs so far (seconds)."""
        return {"train_runs": self.timings}
