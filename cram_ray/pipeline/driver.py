"""The stream driver: prepare the data once, then run every task's stages in order, resumably.

The driver never branches on the method's name and never touches a model: it asks an executor
to run ``(task, stage)`` and reads back the :class:`StageResult`. The ledger decides what is done.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from cram_ray.config import ConfigError, StreamConfig, config_hash, flatten
from cram_ray.data.records import DataError, printable
from cram_ray.eval.metrics import summarize
from cram_ray.pipeline.context import StageContext, TaskMeta
from cram_ray.pipeline.ledger import STAGES, Ledger, StageResult, Storage
from cram_ray.pipeline.stages import STAGE_FUNCS
from cram_ray.train.progress import duration, task_prefix

DATA_STAGE = "data"


class Executor(Protocol):
    """Runs one stage of one task and commits its outputs and marker."""

    def run(self, ctx: StageContext, task: int, stage: str) -> StageResult: ...

    def invalidate(self, ctx: StageContext, task: int, stage: str) -> None:
        """Delete the stage's marker before it reruns (an executor whose running job is to commit it
        leaves it to that job)."""


def execute_stage(ctx: StageContext, task: int, stage: str) -> StageResult:
    """Run a stage function in this process and commit its outputs (the unit every executor runs)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"cram-{stage}-{task}-"))
    try:
        workdir = scratch / "out"
        workdir.mkdir()
        result = STAGE_FUNCS[stage](ctx, task, workdir)
        ctx.ledger.commit(result, workdir)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class LocalExecutor:
    """Every stage in the driver's own process."""

    name = "local"

    def run(self, ctx: StageContext, task: int, stage: str) -> StageResult:
        return execute_stage(ctx, task, stage)

    def invalidate(self, ctx: StageContext, task: int, stage: str) -> None:
        ctx.ledger.invalidate(task, stage)


def code_versions() -> dict[str, int]:
    """Versions of what a run depends on beyond its config: the built-in generator, the base mix and
    the tiny base's training recipe (each bumped whenever its output changes)."""
    from cram_ray.data.builtin import GENERATOR_VERSION
    from cram_ray.data.pretrain_mix import MIX_VERSION
    from cram_ray.models.base import BASE_VERSION

    return {"builtin": GENERATOR_VERSION, "mix": MIX_VERSION, "base": BASE_VERSION}


# where a stream runs, how it survives faults and how it saves time, not what it computes: may
# differ on a resume (the feature cache hands the forward the same frozen-tower outputs)
RESUMABLE_KEYS = ("storage", "train.executor", "train.ray_address", "train.max_failures", "train.stage_retries",
                  "train.checkpoint_every", "train.fuse_eval", "train.run_span", "train.feature_cache_mb",
                  "tracking.", "tune.")


def resumable(key: str) -> bool:
    """Whether a dotted config key is one of RESUMABLE_KEYS (or under one ending in '.')."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def computed_config(cfg: StreamConfig) -> dict[str, Any]:
    """The flattened config without RESUMABLE_KEYS: what the stream computes, not where or how it runs."""
    return {k: v for k, v in flatten(json.loads(json.dumps(cfg.to_dict()))).items() if not resumable(k)}


def default_run_id(cfg: StreamConfig) -> str:
    """Same config, benchmark content and code versions -> same run id, so rerunning a finished or
    interrupted stream resumes it (on any executor or storage: those keys are not hashed), while a run
    made on an older base or on other benchmark files is never resumed."""
    tree: dict[str, Any] = {"config": computed_config(cfg), "versions": code_versions()}
    if cfg.data.benchmark:  # the built-in benchmark's content is its config and generator version
        tree["benchmark"] = benchmark_identity(cfg)[1].hash
    return f"{cfg.method.name}-{config_hash(tree)[:10]}"


# one folder name under the storage root, so a run writes nowhere else (no '/', no '..')
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# folders of the storage root that are not runs
RESERVED_RUN_IDS = ("datasets", "logs", "mlartifacts")


def check_run_id(run_id: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``run_id`` names one new folder under the storage root."""
    if not RUN_ID.fullmatch(run_id) or run_id in RESERVED_RUN_IDS:
        raise ConfigError(f"--run-id '{printable(run_id)}': expected up to 128 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit, other than {', '.join(RESERVED_RUN_IDS)}")


def benchmark_identity(cfg: StreamConfig) -> tuple[Any, Any]:
    """(benchmark metadata, content identity) of the stream's benchmark."""
    from cram_ray.data.builtin import generate_builtin
    from cram_ray.data.identity import identify
    from cram_ray.data.manifest import load_benchmark

    cache = Path(cfg.data.cache_dir).expanduser()
    if cfg.data.benchmark:
        bench = load_benchmark(cfg.data.benchmark, check_images=False)
    else:
        bench = load_benchmark(generate_builtin(cfg.data.builtin, cache / "builtin"), check_images=False)
    return bench, identify(bench, cache / "content")


def _check_same_run(recorded: dict[str, Any], cfg: StreamConfig, identity: Any, storage: Storage) -> None:
    """A resumed run must see the benchmark and config it started with (one line naming what differs)."""
    from cram_ray.data.prepare import FILES

    if recorded.get("benchmark_hash") != identity.hash:
        old_files: dict[str, str] = {}
        dataset = recorded.get("dataset")
        if dataset and storage.exists(f"{dataset}/{FILES}"):
            old_files = json.loads(storage.read_bytes(f"{dataset}/{FILES}"))
        changed = identity.first_difference(old_files) if old_files else identity.paths["manifest"]
        raise DataError(f"benchmark changed since this run started: {changed}; use a new --run-id or --restart")
    old, new = flatten(recorded.get("config", {})), flatten(json.loads(json.dumps(cfg.to_dict())))
    for key in sorted(set(old) | set(new)):
        if resumable(key):
            continue
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            raise ConfigError(f"config changed since this run started: {key} was {old.get(key, '(unset)')!r}, "
                              f"now {new.get(key, '(unset)')!r}; use a new --run-id or --restart")


def prepare_data(cfg: StreamConfig, run_id: str, *, restart: bool = False) -> list[TaskMeta]:
    """The stream's tasks, their shards prepared once per benchmark content under
    ``<storage>/datasets/<hash>`` and shared by every run; the run records the benchmark hash and
    config it started with, and a resume with either changed fails (unless ``restart``)."""
    from cram_ray.data.prepare import dataset_rel, find, prepare

    storage = Storage(cfg.storage)
    ledger = Ledger(storage, run_id)
    bench, identity = benchmark_identity(cfg)
    recorded = None if restart else ledger.marker(-1, DATA_STAGE)
    if recorded is not None:
        _check_same_run(recorded["result"]["metrics"], cfg, identity, storage)
    rel = dataset_rel(identity)
    use_ray = cfg.train.executor == "ray" and find(storage, rel) is None
    if use_ray:  # the executor connects at its first stage; the image pass needs the cluster now
        from cram_ray.pipeline.ray_cluster import connect

        connect(cfg.train)
    marker = prepare(bench, identity, storage, rel, use_ray=use_ray)
    metas = [TaskMeta(t["name"], t["metric"], t["train"], t["test"], rel) for t in marker["tasks"]]
    if recorded is None:
        metrics = {"benchmark": bench.name, "benchmark_hash": identity.hash, "dataset": rel,
                   "config": cfg.to_dict(), "tasks": [m.__dict__ for m in metas]}
        with tempfile.TemporaryDirectory(prefix="cram-data-") as empty:
            ledger.commit(StageResult(DATA_STAGE, -1, metrics), Path(empty))
    return metas


def environment() -> dict[str, Any]:
    """Package versions and hardware, recorded with every result."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "ray", "transformers", "peft", "deepspeed", "mlflow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(), "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "packages": versions,
    }


def run_stream(
    cfg: StreamConfig,
    *,
    run_id: str,
    executor: Executor,
    tracker: Any = None,
    benchmark_name: Optional[str] = None,
    on_task: Optional[Callable[[int, dict[str, Any]], None]] = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the whole stream; returns the summary (docs/DESIGN.md §8).

    ``on_task(t, progress)`` is called after task ``t``'s evaluation, also for tasks a resumed
    run verified rather than ran, with the running MFT/MFN/MAA/BWT, ``params_added_total`` so far,
    the routing accuracy and ``tasks_done`` (a Tune trial reports these). ``restart`` reruns every
    stage of the run from the data stage instead of resuming.
    """
    t_start = time.time()
    tasks = prepare_data(cfg, run_id, restart=restart)
    ctx = StageContext(cfg, run_id, tasks)
    ledger = ctx.ledger
    results: dict[tuple[int, str], StageResult] = {}
    redo = restart  # once one stage reruns, every later stage reruns too (their inputs changed)
    ran: list[tuple[int, str]] = []
    for t in range(len(tasks)):
        prefix = task_prefix(t, len(tasks), tasks[t].name)
        skipped = []
        for stage in STAGES:
            res = None if redo else ledger.verify(t, stage)
            if res is None:
                if skipped:
                    print(f"{prefix} {', '.join(skipped)}: done earlier, kept", flush=True)
                    skipped = []
                redo = True
                executor.invalidate(ctx, t, stage)
                print(f"{prefix} {stage} ...", flush=True)
                res = executor.run(ctx, t, stage)
                print(f"{prefix} {stage} done in {duration(res.seconds)}{stage_outcome(res, tasks)}", flush=True)
                ran.append((t, stage))
                if tracker is not None:
                    tracker.stage_done(res, tasks)
            else:
                skipped.append(stage)
            results[(t, stage)] = res
        if skipped:
            print(f"{prefix} {', '.join(skipped)}: done earlier, kept", flush=True)
        if tracker is not None and redo:
            matrix = [results[(i, "evaluate")].metrics["row"] for i in range(t + 1)]
            tracker.task_done(t, tasks, {s: results[(t, s)] for s in STAGES}, matrix)
        if on_task is not None:
            on_task(t, task_progress(t, tasks, results))
    skipped = len(tasks) * len(STAGES) - len(ran)
    summary = build_summary(cfg, tasks, results, time.time() - t_start, benchmark_name, resumed=skipped > 0)
    summary["resumed_stages_skipped"] = skipped
    summary["stages_run"] = [f"task_{t}/{s}" for t, s in ran]
    return summary


def stage_outcome(res: StageResult, tasks: list[TaskMeta]) -> str:
    """What the end-of-stage line adds: the evaluation's scores per task so far."""
    if res.stage != "evaluate":
        return ""
    routing = res.metrics.get("routing_accuracy")
    return (": " + ", ".join(f"{tasks[i].name} {v:.1f}" for i, v in enumerate(res.metrics["row"]))
            + (f" (routed right {routing:.1f}%)" if routing is not None else ""))


def task_progress(t: int, tasks: list[TaskMeta], results: dict[tuple[int, str], StageResult]) -> dict[str, Any]:
    """The stream's running numbers after task ``t``."""
    matrix = [results[(i, "evaluate")].metrics["row"] for i in range(t + 1)]
    params = sum(int(results[(i, "aggregate")].metrics.get("params_added", 0)) for i in range(t + 1))
    routing = results[(t, "evaluate")].metrics.get("routing_accuracy")
    return {**summarize(matrix), "params_added_total": params, "tasks_done": t + 1, "task": tasks[t].name,
            "routing_accuracy": routing}


def build_summary(cfg: StreamConfig, tasks: list[TaskMeta], results: dict[tuple[int, str], StageResult],
                  wall: float, benchmark_name: Optional[str], *, resumed: bool = False) -> dict[str, Any]:
    """The stream's summary.json. ``resumed``: some stages were committed by an earlier run, so
    ``wall`` (this run's) does not cover their seconds and ``overhead_fraction`` is None."""
    matrix = [results[(t, "evaluate")].metrics["row"] for t in range(len(tasks))]
    final_eval = results[(len(tasks) - 1, "evaluate")].metrics
    stage_seconds: dict[str, float] = {s: 0.0 for s in STAGES}
    startup = 0.0
    for (t, s), res in results.items():
        stage_seconds[s] += res.seconds
        startup += res.startup_seconds
    compute = sum(stage_seconds.values()) - startup
    # everything but compute is orchestration: stage start-up (workers, actor pools, restores) and what
    # no stage timed (data preparation, Train run set-up, driver work); defined for a fresh run only
    overhead = None if resumed else ((wall - compute) / wall if wall > 0 else 0.0)
    stage_seconds.update({"startup": startup, "compute": compute, "wall": wall, "overhead_fraction": overhead})
    params = [int(results[(t, "aggregate")].metrics.get("params_added", 0)) for t in range(len(tasks))]
    summary = {
        "method": cfg.method.name,
        "benchmark": benchmark_name or (cfg.data.benchmark or "builtin"),
        "tasks": [t.name for t in tasks],
        "accuracy_matrix": matrix,
        **summarize(matrix),
        "routing_accuracy": final_eval.get("routing_accuracy"),
        "routing_confusion": final_eval.get("confusion"),
        "params_added": params,
        "params_added_total": sum(params),
        "ranks": [results[(t, "aggregate")].metrics.get("ranks", {}) for t in range(len(tasks))],
        "stage_seconds": stage_seconds,
        "seed": cfg.train.seed,
        "environment": environment(),
        "mlflow_run_id": None,
    }
    return summary


def format_matrix(summary: dict[str, Any]) -> str:
    names = summary["tasks"]
    width = max(8, max(len(n) for n in names) + 1)
    lines = ["after \\ on".ljust(14) + "".join(n[:width - 1].rjust(width) for n in names)]
    for t, row in enumerate(summary["accuracy_matrix"]):
        lines.append(names[t][:13].ljust(14) + "".join(f"{v:{width}.1f}" for v in row))
    lines.append(
        f"MFT {summary['mft']:.1f}  MFN {summary['mfn']:.1f}  MAA {summary['maa']:.1f}  BWT {summary['bwt']:.1f}"
        + (f"  routing {summary['routing_accuracy']:.1f}%" if summary.get("routing_accuracy") is not None else "")
        + f"  params added {summary['params_added_total']}"
    )
    return "\n".join(lines)
