"""From a resolved config to a finished stream: executor, tracking, summary.json, plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from cram_ray.config import StreamConfig
from cram_ray.pipeline.driver import LocalExecutor, default_run_id, format_matrix, run_stream
from cram_ray.pipeline.ledger import Storage
from cram_ray.pipeline.logs import log_file, set_log_dir


def make_executor(cfg: StreamConfig):
    if cfg.train.executor == "ray":
        from cram_ray.pipeline.ray_executor import RayExecutor

        return RayExecutor(cfg)
    return LocalExecutor()


def write_plots(summary: dict[str, Any], out: Path) -> None:
    from cram_ray.report.plots import accuracy_heatmap, rank_map, ranks_by_layer, routing_confusion

    title = f"{summary['method']}: accuracy after each task"
    accuracy_heatmap(summary["accuracy_matrix"], summary["tasks"], out / "accuracy_matrix.png", title=title)
    # a method reports {"per_layer": {layer: rank}, ...summaries} per task, or nothing
    by_layer = ranks_by_layer([r.get("per_layer", {}) for r in summary.get("ranks") or []])
    if by_layer:
        rank_map(by_layer, out / "rank_map.png", task_names=summary["tasks"])
    if summary.get("routing_confusion"):
        routing_confusion(summary["routing_confusion"], summary["tasks"], out / "routing_confusion.png")


def previous_mlflow_run(out: Path, run_id: str) -> Optional[str]:
    path = out / "summary.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("run_id") == run_id:
            return old.get("mlflow_run_id")
    return None


def run_and_report(cfg: StreamConfig, *, out: Path, run_id: Optional[str] = None,
                   on_task: Optional[Callable[[int, dict[str, Any]], None]] = None,
                   mlflow_tags: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run or resume the stream, then write ``out/summary.json`` + plots and log them to MLflow.

    ``on_task`` is passed to :func:`run_stream`; ``mlflow_tags`` are set on the stream's run (e.g.
    ``mlflow.parentRunId`` to nest it under a study or comparison).
    """
    from cram_ray.pipeline.track import StreamReporter

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or default_run_id(cfg)
    set_log_dir(out / "logs")
    executor = make_executor(cfg)
    reporter = StreamReporter(cfg, out, run_id, previous_mlflow_run(out, run_id))
    if mlflow_tags:
        reporter.tracker.set_tags(mlflow_tags)
    print(f"[stream] run {run_id}: method {cfg.method.name}, executor {cfg.train.executor}, "
          f"storage {cfg.storage}" + (f", mlflow run {reporter.run_id}" if reporter.run_id else ""), flush=True)
    try:
        summary = run_stream(cfg, run_id=run_id, executor=executor, tracker=reporter, on_task=on_task)
    except BaseException:
        reporter.fail()
        raise
    summary["run_id"] = run_id
    summary["mlflow_run_id"] = reporter.run_id
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plots(summary, out)
    reporter.finish(summary, out, Storage(cfg.storage), run_id)
    print(format_matrix(summary) + "\n" + where_text(out, reporter.tracker.uri, reporter.run_id), flush=True)
    return summary


def where_text(out: Path, tracking_uri: Optional[str], mlflow_run: Optional[str]) -> str:
    """The closing lines: where the results are and how to open them."""
    lines = [f"summary  {out / 'summary.json'}"]
    lines += [f"plot     {out / name}" for name in ("accuracy_matrix.png", "rank_map.png", "routing_confusion.png")
              if (out / name).exists()]
    if tracking_uri:
        lines += [f"MLflow   run {mlflow_run} in {tracking_uri}",
                  f"         browse: mlflow ui --backend-store-uri {tracking_uri}"]
    ray_log = log_file()
    if ray_log is not None and ray_log.exists():
        lines.append(f"Ray log  {ray_log}")
    return "\n".join(lines)
