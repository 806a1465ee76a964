"""What the driver tells MLflow about a stream: per-stage numbers, per-task rows, final artifacts.

Only the driver logs (CONVENTIONS #5). One parent run per stream with the flattened config as
params; one nested run per task with its stages' numbers; accuracy-matrix rows and the running
MFT/MFN/MAA/BWT on the parent at step t; summary.json, plots, final expert weights and the
predictions as artifacts.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Mapping, Optional

from cram_ray.config import StreamConfig
from cram_ray.eval.metrics import summarize
from cram_ray.pipeline.context import TaskMeta
from cram_ray.pipeline.ledger import STAGES, StageResult, Storage
from cram_ray.pipeline.outputs import TrackingPlace
from cram_ray.tracking.mlflow_tracker import StreamTracker


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

    def stage_done(self, res: StageResult, tasks: list[TaskMeta]) -> None:
        with self.tracker.task_run(res.task, tasks[res.task].name) as run:
            metrics = {res.stage: numeric_only(res.metrics) or {}}
            metrics[res.stage]["seconds"] = res.seconds
            metrics[res.stage]["startup_seconds"] = res.startup_seconds
            run.log_metrics(metrics)

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
        self.tracker.log_metrics({k: summary[k] for k in ("mft", "mfn", "maa", "bwt", "params_added_total")})
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
