"""What the driver tells MLflow about a stream: per-stage numbers, per-task rows, final artifacts.

Only the driver logs (docs/DESIGN.md §9): workers put what MLflow should see into their stage
results. One parent run per stream with the flattened config as params, the code's git revision
(MLflow's ``mlflow.source.git.commit`` tag, or the package version outside a checkout), and
``config.yaml`` + ``environment.json`` as artifacts; one nested run per task with its stages'
numbers, the probe's and the training's loss curves (``probe.loss``, ``train.loss`` by step) and
the per-layer ranks as ``ranks/<stage>.json``; accuracy-matrix rows and the running
MFT/MFN/MAA/BWT on the parent at step t, the final values at the last task's step; summary.json, plots,
``ranks.csv`` (layer x task), final expert weights and the predictions as artifacts.
"""
from __future__ import annotations

import csv
import io
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional

from cram_ray.config import StreamConfig
from cram_ray.eval.metrics import summarize
from cram_ray.pipeline.context import TaskMeta
from cram_ray.pipeline.ledger import STAGES, StageResult, Storage
from cram_ray.pipeline.outputs import TrackingPlace
from cram_ray.tracking.mlflow_tracker import StreamTracker

CURVE = "curve"  # a fit's compact loss curve in a stage report: {"step": [...], "loss": [...]}


def numeric_only(tree: Any) -> Any:
    """Drop strings and None from a nested report so only numbers reach MLflow metrics."""
    if isinstance(tree, Mapping):
        kept = {str(k): numeric_only(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v not in (None, {}, [])}
    if isinstance(tree, (list, tuple)):
        kept = [numeric_only(v) for v in tree]
        return kept if all(v is not None for v in kept) else None
    if isinstance(tree, bool):
        return int(tree)
    if isinstance(tree, numbers.Number):
        return tree
    return None


class StreamReporter:
    """The driver's MLflow voice; a no-op when tracking is disabled."""

    def __init__(self, cfg: StreamConfig, place: TrackingPlace, run_id: str, resume_mlflow_run: Optional[str]) -> None:
        self.cfg = cfg
        self.tracker = StreamTracker(place.tracking(cfg.tracking), place.local_dir, run_id,
                                     resume_run_id=resume_mlflow_run, artifact_location=place.artifact_location)
        if resume_mlflow_run is None and cfg.tracking.enabled:
            self.tracker.resume_run_id = self.tracker.find_run(run_id)
        self.run_id = self.tracker.start(cfg.to_dict())
        self.tracker.set_tags({"cram_ray.run_id": run_id, "cram_ray.method": cfg.method.name,
                               "cram_ray.executor": cfg.train.executor})
        if self.run_id:
            self.record_provenance()

    def record_provenance(self) -> None:
        """Which code and which machine: git revision (or version) tags, config and environment files."""
        import yaml

        from cram_ray.pipeline.driver import code_versions, environment
        from cram_ray.tracking.provenance import code_revision

        code = code_revision()
        tags = {"cram_ray.version": code["version"]}
        if code["git_commit"]:
            tags.update({"mlflow.source.git.commit": code["git_commit"], "cram_ray.git_dirty": code["git_dirty"]})
        self.tracker.set_tags(tags)
        self.tracker.log_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), "config.yaml")
        self.tracker.log_dict({"code": code, "code_versions": code_versions(), **environment()}, "environment.json")

    def stage_done(self, res: StageResult, tasks: list[TaskMeta]) -> None:
        report, per_layer = without_per_layer(res.metrics)
        curve = report.pop(CURVE, None)
        with self.tracker.task_run(res.task, tasks[res.task].name) as run:
            metrics = {res.stage: numeric_only(report) or {}}
            metrics[res.stage]["seconds"] = res.seconds
            metrics[res.stage]["startup_seconds"] = res.startup_seconds
            run.log_metrics(metrics)
            if curve:
                run.log_series(f"{res.stage}.loss", curve["step"], curve["loss"])
            if per_layer is not None:
                run.log_dict(per_layer, f"ranks/{res.stage}.json")

    def task_done(self, t: int, tasks: list[TaskMeta], results: dict[str, StageResult],
                  matrix: list[list[float]]) -> None:
        evaluate = results["evaluate"].metrics
        metrics: dict[str, Any] = {f"acc.{tasks[i].name}": v for i, v in enumerate(evaluate["row"])}
        metrics.update(summarize(matrix))
        if evaluate.get("routing_accuracy") is not None:
            metrics["routing_accuracy"] = evaluate["routing_accuracy"]
        metrics["params_added"] = results["aggregate"].metrics.get("params_added", 0)
        metrics["stage_seconds"] = {s: results[s].seconds for s in STAGES}
        self.tracker.log_metrics(metrics, step=t)

    def finish(self, summary: dict[str, Any], out: Path, storage: Storage, run_id: str, scratch: Path) -> None:
        """Log the final numbers and artifacts: ``out`` holds summary.json and the plots (a local
        directory); the final expert state and predictions come from ``storage`` (via ``scratch``
        when it is an object store)."""
        last = len(summary["tasks"]) - 1
        # at the last task's step: the curves task_done drew along the stream end where they should
        self.tracker.log_metrics({k: summary[k] for k in ("mft", "mfn", "maa", "bwt", "params_added_total")}, step=last)
        table = rank_table(summary)
        if table:
            self.tracker.log_text(table, "ranks.csv")
        for name in ("summary.json", "accuracy_matrix.png", "rank_map.png", "routing_confusion.png"):
            if (out / name).exists():
                self.tracker.log_artifact(out / name)
        if not self.tracker.enabled:
            self.tracker.finish("FINISHED")
            return
        final_state = storage.get_dir(f"{run_id}/task_{last}/aggregate", scratch / "aggregate")
        for name in ("state.safetensors", "state.json"):
            if (final_state / name).exists():
                self.tracker.log_artifact(final_state / name, "experts")
        evaluate = storage.get_dir(f"{run_id}/task_{last}/evaluate", scratch / "evaluate")
        if (evaluate / "predictions.jsonl").exists():
            self.tracker.log_artifact(evaluate / "predictions.jsonl", "predictions")
        self.tracker.finish("FINISHED")

    def fail(self) -> None:
        self.tracker.finish("FAILED")


def without_per_layer(report: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """A stage report without its ``per_layer`` rank table (top level or under ``ranks``), and the
    table: hundreds of layers belong in a file, not in hundreds of metric keys."""
    report = dict(report)
    per_layer = report.pop("per_layer", None)
    ranks = report.get("ranks")
    if isinstance(ranks, Mapping) and "per_layer" in ranks:
        per_layer = ranks["per_layer"]
        report["ranks"] = {k: v for k, v in ranks.items() if k != "per_layer"}
    return report, per_layer


def rank_table(summary: dict[str, Any]) -> str:
    """CSV of the rank each task's expert has in each adapted layer: one row per layer, one column
    per task (empty where the task added nothing there); "" when the method reports no ranks."""
    per_task = [r.get("per_layer") or {} for r in summary.get("ranks") or []]
    layers = list(dict.fromkeys(name for ranks in per_task for name in ranks))
    if not layers:
        return ""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", *summary["tasks"][:len(per_task)]])
    for name in layers:
        writer.writerow([name, *(ranks.get(name, "") for ranks in per_task)])
    return buf.getvalue()
