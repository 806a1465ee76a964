"""The stream driver: prepare the data once, then run every task's stages in order, resumably.

The driver never branches on the method's name and never touches a model: it asks an executor
to run ``(task, stage)`` and reads back the :class:`StageResult`. The ledger decides what is done.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from cram_ray.config import StreamConfig, config_hash
from cram_ray.eval.metrics import summarize
from cram_ray.pipeline.context import StageContext, TaskMeta
from cram_ray.pipeline.ledger import STAGES, Ledger, StageResult, Storage
from cram_ray.pipeline.stages import STAGE_FUNCS
from cram_ray.train.progress import duration, task_prefix

DATA_STAGE = "data"


class Executor(Protocol):
    """Runs one stage of one task and commits its outputs and marker."""

    def run(self, ctx: StageContext, task: int, stage: str) -> StageResult: ...


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


def code_versions() -> dict[str, int]:
    """Versions of what a run depends on beyond its config: the built-in generator, the base mix and
    the tiny base's training recipe (each bumped whenever its output changes)."""
    from cram_ray.data.builtin import GENERATOR_VERSION
    from cram_ray.data.pretrain_mix import MIX_VERSION
    from cram_ray.models.base import BASE_VERSION

    return {"builtin": GENERATOR_VERSION, "mix": MIX_VERSION, "base": BASE_VERSION}


def default_run_id(cfg: StreamConfig) -> str:
    """Same config and code versions -> same run id, so rerunning a finished or interrupted stream
    resumes it, while a run made on an older base or benchmark is never resumed on a newer one."""
    return f"{cfg.method.name}-{config_hash({'config': cfg.to_dict(), 'versions': code_versions()})[:10]}"


def prepare_data(cfg: StreamConfig, run_id: str) -> list[TaskMeta]:
    """Shards of every task and split under ``<storage>/<run_id>/data`` (done once per run)."""
    from cram_ray.data.builtin import generate_builtin, vocabulary_texts
    from cram_ray.data.manifest import load_benchmark
    from cram_ray.data.shards import write_shards

    storage = Storage(cfg.storage)
    ledger = Ledger(storage, run_id)
    rel = f"{run_id}/{DATA_STAGE}"
    done = ledger.verify(-1, DATA_STAGE)
    if done is not None:
        return [TaskMeta(**t) for t in done.metrics["tasks"]]
    t0 = time.time()
    if cfg.data.benchmark:
        manifest = Path(cfg.data.benchmark)
        corpus: list[str] = []
    else:
        cache = Path(cfg.data.cache_dir).expanduser() / "builtin"
        manifest = generate_builtin(cfg.data.builtin, cache)
        corpus = vocabulary_texts()
    bench = load_benchmark(manifest)
    metas = []
    with tempfile.TemporaryDirectory(prefix="cram-data-") as tmp:
        out = Path(tmp)
        for task in bench.tasks:
            counts = {}
            for split in ("train", "test"):
                records = task.records(split)
                counts[split] = len(records)
                write_shards(records, out / task.name / split)
                if split == "train" and cfg.data.benchmark:
                    corpus.extend(f"{r.instruction} {r.answer}" for r in records)
            metas.append(TaskMeta(task.name, task.metric, counts["train"], counts["test"]))
        (out / "corpus.json").write_text(json.dumps(sorted(set(corpus))))
        result = StageResult(DATA_STAGE, -1, {"benchmark": bench.name, "tasks": [m.__dict__ for m in metas]},
                             time.time() - t0)
        ledger.commit(result, out)
    print(f"[data] {bench.name}: {len(metas)} tasks prepared in {time.time() - t0:.1f}s", flush=True)
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
) -> dict[str, Any]:
    """Run (or resume) the whole stream; returns the summary (docs/DESIGN.md §8).

    ``on_task(t, progress)`` is called after task ``t``'s evaluation, also for tasks a resumed
    run verified rather than ran, with the running MFT/MFN/MAA/BWT, ``params_added_total`` so far,
    the routing accuracy and ``tasks_done`` (a Tune trial reports these).
    """
    t_start = time.time()
    tasks = prepare_data(cfg, run_id)
    ctx = StageContext(cfg, run_id, tasks)
    ledger = ctx.ledger
    results: dict[tuple[int, str], StageResult] = {}
    redo = False  # once one stage reruns, every later stage reruns too (their inputs changed)
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
                ledger.invalidate(t, stage)
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
    summary = build_summary(cfg, tasks, results, time.time() - t_start, benchmark_name)
    summary["resumed_stages_skipped"] = len(tasks) * len(STAGES) - len(ran)
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
                  wall: float, benchmark_name: Optional[str]) -> dict[str, Any]:
    matrix = [results[(t, "evaluate")].metrics["row"] for t in range(len(tasks))]
    final_eval = results[(len(tasks) - 1, "evaluate")].metrics
    stage_seconds: dict[str, float] = {s: 0.0 for s in STAGES}
    startup = 0.0
    for (t, s), res in results.items():
        stage_seconds[s] += res.seconds
        startup += res.startup_seconds
    compute = sum(stage_seconds.values()) - startup
    stage_seconds.update({"startup": startup, "compute": compute, "wall": wall})
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
