"""From a resolved config to a finished stream: executor, tracking, summary.json, plots."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from cram_ray.config import StreamConfig
from cram_ray.pipeline.driver import LocalExecutor, check_run_id, default_run_id, format_matrix, run_stream
from cram_ray.pipeline.ledger import Storage
from cram_ray.pipeline.lock import RunLock
from cram_ray.pipeline.logs import log_file, set_log_dir
from cram_ray.pipeline.outputs import TrackingPlace, tracking_place


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


def previous_mlflow_run(out: Storage, run_id: str) -> Optional[str]:
    if out.exists("summary.json"):
        old = out.read_json("summary.json")
        if old.get("run_id") == run_id:
            return old.get("mlflow_run_id")
    return None


def where_line(cfg: StreamConfig, out: Union[str, Path]) -> str:
    """One line saying where a stream's files and its MLflow runs went."""
    store, ledger = Storage(str(out)), Storage(cfg.storage)
    where = f"[stream] summary.json and plots in {store.uri}"
    where += "" if ledger.uri == store.uri else f", stage ledger in {ledger.uri}"
    return f"{where}; {tracking_place(cfg, store).describe()}"


def run_and_report(cfg: StreamConfig, *, out: Union[str, Path], run_id: Optional[str] = None,
                   on_task: Optional[Callable[[int, dict[str, Any]], None]] = None,
                   mlflow_tags: Optional[dict[str, Any]] = None, lock_wait: float = 0.0,
                   restart: bool = False) -> dict[str, Any]:
    """Run or resume the stream, then write ``out/summary.json`` + plots and log them to MLflow.

    ``out`` is a local directory or an object-store URI; the run's lock is held on it throughout
    (a second driver on the same ``out`` stops with :class:`RunLocked`, after ``lock_wait``
    seconds of retrying). ``on_task`` is passed to
    :func:`run_stream`; ``mlflow_tags`` are set on the stream's run (e.g. ``mlflow.parentRunId``
    to nest it under a study or comparison); ``restart`` reruns the run from its data stage.
    """
    store = Storage(str(out))
    run_id = run_id or default_run_id(cfg)
    check_run_id(run_id)
    # matplotlib would otherwise write its font cache and config folder under HOME: a run writes
    # only to its output and the cache
    os.environ.setdefault("MPLCONFIGDIR", str(Path(cfg.data.cache_dir).expanduser() / "matplotlib"))
    with RunLock(store).acquire(wait=lock_wait), tempfile.TemporaryDirectory(prefix="cram-out-") as tmp:
        # matplotlib and MLflow want local files: written in place when out is local, else here and uploaded
        files = store.local_path("") or Path(tmp) / "out"
        files.mkdir(parents=True, exist_ok=True)
        place = tracking_place(cfg, store)
        place.pull(store)
        try:
            summary = _run(cfg, store, files, Path(tmp), place, run_id, on_task, mlflow_tags, restart)
        finally:
            place.push(store)
    return summary


def _run(cfg: StreamConfig, store: Storage, files: Path, scratch: Path, place: TrackingPlace, run_id: str,
         on_task: Optional[Callable[[int, dict[str, Any]], None]],
         mlflow_tags: Optional[dict[str, Any]], restart: bool) -> dict[str, Any]:
    from cram_ray.pipeline.track import StreamReporter

    set_log_dir(files / "logs")  # uploaded with the other files when out is an object store
    executor = make_executor(cfg)
    reporter = StreamReporter(cfg, place, run_id, previous_mlflow_run(store, run_id))
    if mlflow_tags:
        reporter.tracker.set_tags(mlflow_tags)
    print(f"[stream] run {run_id}: method {cfg.method.name}, executor {cfg.train.executor}, "
          f"storage {cfg.storage}" + (f", mlflow run {reporter.run_id}" if reporter.run_id else ""), flush=True)
    try:
        summary = run_stream(cfg, run_id=run_id, executor=executor, tracker=reporter, on_task=on_task,
                             restart=restart)
    except BaseException:
        reporter.fail()
        raise
    summary["run_id"] = run_id
    summary["mlflow_run_id"] = reporter.run_id
    summary["out"] = store.uri
    summary["mlflow_tracking_uri"] = place.uri
    (files / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plots(summary, files)
    store.put_dir(files, "")
    reporter.finish(summary, files, Storage(cfg.storage), run_id, scratch)
    print(format_matrix(summary) + "\n" + where_text(store, reporter.tracker.uri, reporter.run_id, files=files),
          flush=True)
    return summary


def where_text(out: Union[Storage, Path], tracking_uri: Optional[str], mlflow_run: Optional[str], *,
               files: Optional[Path] = None) -> str:
    """The closing lines: where the results are and how to open them. ``out`` is the run's output
    (a local directory or a Storage on an object store); ``files`` the local copy of its files."""
    store = out if isinstance(out, Storage) else Storage(str(out))
    files = files or store.local_path("")
    lines = [f"summary  {store.location('summary.json')}"]
    lines += [f"plot     {store.location(name)}" for name in ("accuracy_matrix.png", "rank_map.png", "routing_confusion.png")
              if files is not None and (files / name).exists()]
    if tracking_uri:
        lines += [f"MLflow   run {mlflow_run} in {tracking_uri}",
                  f"         browse: mlflow ui --backend-store-uri {tracking_uri}"]
    ray_log = log_file()
    if ray_log is not None and ray_log.exists():
        lines.append(f"Ray log  {ray_log if store.local else store.location('logs/' + ray_log.name)}")
    return "\n".join(lines)
