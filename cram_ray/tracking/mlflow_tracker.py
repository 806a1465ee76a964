"""MLflow tracking of one stream: one run per stream, one nested child run per task, from the driver.

Only the driver process logs (docs/DESIGN.md §9): workers write their outputs to storage and
the driver reports what the stage results say. Everything goes through an explicit
``mlflow.MlflowClient`` bound to this tracker's URI -- never the process-wide fluent API
(``mlflow.start_run``), so nothing leaks between streams running in one process.

Storage: with ``TrackingConfig.uri`` unset, runs live in ``sqlite:////<storage_dir>/mlflow.db`` and
artifacts under ``<storage_dir>/mlartifacts`` (MLflow 3.13+ refuses the old ``./mlruns`` store, and a
relative artifact root would land in whatever directory the driver started in). The experiment is
created once, then found by name. With ``enabled=False`` every method is a no-op and mlflow is never
imported.

Resuming: pass the ``run_id`` that :meth:`StreamTracker.start` returned (it is written to
``summary.json`` as ``mlflow_run_id``; :meth:`StreamTracker.find_run` looks it up by run name) as
``resume_run_id``; the same run is reopened, metrics append to it, and :meth:`task_run` reopens the
existing child run of a task instead of creating a second one. MLflow forbids changing a logged
param, so a param whose value differs on resume keeps its first value and the new one is recorded
as the tag ``resumed_param.<key>``.
"""
from __future__ import annotations

import contextlib
import json
import numbers
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

from cram_ray.config import TrackingConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

MAX_PARAM_VALUE = 6000  # MLflow's MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # MLflow's MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
BATCH = 100  # MLflow accepts at most 100 params + tags per log_batch call
TRUNCATED = "...[truncated]"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_KIND = "cram_ray.kind"  # "stream" or "task"
TAG_TASK_INDEX = "cram_ray.task_index"
TAG_RESUMES = "cram_ray.resumes"

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")

PathLike = Union[str, Path]


def _key(name: str) -> str:
    """A valid MLflow param/metric key: characters outside [/\\w.- :] become '_'."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return _clip(text, MAX_PARAM_VALUE)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{dotted.key: str}`` ready for MLflow.

    Nested non-empty mappings become dotted keys; lists and empty mappings are JSON; None, bools and
    numbers their ``str``. Values longer than MLflow's 6000-character cap are cut and end with
    "...[truncated]" (deterministically, so a resumed run compares equal); keys keep only the
    characters MLflow allows.
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
        else:
            out[_key(name)] = _param_value(value)
    return out


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested mapping of numbers -> ``{dotted.key: float}``; lists of numbers get ``.0``, ``.1``, ...

    None entries are skipped (a metric that does not apply, e.g. routing accuracy of a method
    without routing); anything else that is not a number raises TypeError naming the key.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.update(flatten_metrics({str(i): v for i, v in enumerate(value)}, name + "."))
        elif isinstance(value, numbers.Real):
            out[_key(name)] = float(value)
        elif hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            out.update(flatten_metrics({key: value.item()}, prefix))
        else:
            raise TypeError(f"metric '{name}': expected a number, got {type(value).__name__} {value!r}")
    return out


def default_tracking_uri(storage_dir: PathLike) -> str:
    """``sqlite:////abs/path/mlflow.db`` under ``storage_dir`` (four slashes: absolute path)."""
    return "sqlite:///" + str(Path(storage_dir).expanduser().resolve() / "mlflow.db")


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunLogger:
    """Logging into one MLflow run (the stream's, or a task's child run); a no-op without a client."""

    def __init__(self, client: Optional["MlflowClient"], run_id: Optional[str]) -> None:
        self._client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Log numbers (nested mappings and lists flattened, see :func:`flatten_metrics`) at ``step``."""
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(k, v, ts, int(step or 0)) for k, v in flatten_metrics(metrics).items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

    def log_series(self, key: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """One metric's history: ``values[i]`` at step ``steps[i]`` (a loss curve)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(_key(key), float(v), ts, int(s)) for s, v in zip(steps, values)]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log a (nested) param tree; returns the params whose logged value differs and was kept.

        A key logged before with the same value is skipped; with a different value the first value
        stays (MLflow forbids changing it) and the new one goes to the tag ``resumed_param.<key>``.
        """
        if not self.active:
            return {}
        from mlflow.entities import Param, RunTag

        flat = flatten_params(params)
        logged = self._client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
        tags = [RunTag(_key(f"resumed_param.{k}"), _clip(v, MAX_TAG_VALUE)) for k, v in changed.items()]
        for i in range(0, len(new), BATCH):
            self._client.log_batch(self.run_id, params=new[i:i + BATCH], synchronous=True)
        for i in range(0, len(tags), BATCH):
            self._client.log_batch(self.run_id, tags=tags[i:i + BATCH], synchronous=True)
        return changed

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        for k, v in tags.items():
            self._client.set_tag(self.run_id, _key(k), _clip(str(v), MAX_TAG_VALUE))

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Copy a file, or a directory's contents, into the run's artifacts (under ``artifact_path``)."""
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"log_artifact: {path} does not exist")

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Write ``data`` as an artifact file; JSON, or YAML if ``artifact_file`` ends in .yaml/.yml."""
        if not self.active:
            return
        self._client.log_dict(self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as an artifact file (a CSV table, a YAML config)."""
        if not self.active:
            return
        self._client.log_text(self.run_id, text, artifact_file)


class StreamTracker:
    """One MLflow run for one stream, with a nested child run per task. Use from the driver only.

    Args:
        cfg: the ``tracking`` section; ``enabled=False`` makes every call a no-op.
        storage_dir: where the default sqlite store and the artifacts go (see the module docstring).
        run_name: the run's display name (the pipeline's run id is a good one: it is also what
            :meth:`find_run` matches).
        resume_run_id: an MLflow run id from an earlier :meth:`start`; that run is reopened.
        artifact_location: where a new experiment keeps artifacts (a path or URI, e.g. on the
            run's object store); default: ``<storage_dir>/mlartifacts`` for a file store.
    """

    def __init__(self, cfg: TrackingConfig, storage_dir: PathLike, run_name: str,
                 resume_run_id: Optional[str] = None, kind: str = "stream",
                 artifact_location: Optional[str] = None) -> None:
        self.cfg = cfg
        self.kind = kind
        self.enabled = bool(cfg.enabled)
        self.storage_dir = Path(storage_dir).expanduser().resolve()
        self.run_name = run_name
        self.resume_run_id = resume_run_id
        self.artifact_location = artifact_location
        self.uri: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._client: Optional["MlflowClient"] = None
        self._root = RunLogger(None, None)
        if self.enabled:
            self.uri = cfg.uri or default_tracking_uri(self.storage_dir)
            if self.uri.startswith("sqlite:"):
                self.storage_dir.mkdir(parents=True, exist_ok=True)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def run_id(self) -> Optional[str]:
        """The stream's MLflow run id once started (None while disabled or not started)."""
        return self._root.run_id

    def _connect(self) -> "MlflowClient":
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment()
        return self._client

    def _artifact_location(self) -> Optional[str]:
        if self.artifact_location:
            return self.artifact_location
        # A remote tracking server owns its artifact store; a local database gets ours.
        if self.uri and not self.uri.startswith(("sqlite:", "file:", "/")):
            return None
        return (self.storage_dir / "mlartifacts").as_uri()

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self._client
        name = self.cfg.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=self._artifact_location())
            except MlflowException:
                exp = client.get_experiment_by_name(name)  # another driver created it just now
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def start(self, params: Mapping[str, Any]) -> Optional[str]:
        """Open the stream's run (or reopen ``resume_run_id``), log ``params``; returns the run id.

        ``params`` may be nested (``StreamConfig.to_dict()``); it is flattened with
        :func:`flatten_params`, and the full tree is also stored as the artifact ``params.json``.
        """
        if not self.enabled:
            return None
        client = self._connect()
        if self.resume_run_id:
            from mlflow.exceptions import MlflowException

            try:
                run = client.get_run(self.resume_run_id)
            except MlflowException:
                raise ValueError(
                    f"tracking: cannot resume MLflow run {self.resume_run_id!r}: not found at {self.uri}"
                ) from None
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            resumes = int(run.data.tags.get(TAG_RESUMES, "0")) + 1
            self._root = RunLogger(client, run_id)
            self._root.set_tags({TAG_RESUMES: resumes})
        else:
            run = client.create_run(self.experiment_id, run_name=self.run_name,
                                    tags={TAG_KIND: self.kind, "cram_ray.run_name": self.run_name})
            self._root = RunLogger(client, run.info.run_id)
        self._root.log_params(params)
        self._root.log_dict(params, "params.json")
        return self._root.run_id

    def find_run(self, run_name: Optional[str] = None) -> Optional[str]:
        """The newest stream run (not a task's child run) named ``run_name`` (default: this
        tracker's), or None: what to pass as ``resume_run_id`` when the id was not kept."""
        if not self.enabled:
            return None
        client = self._connect()
        name = (run_name or self.run_name).replace("'", "\\'")
        runs = client.search_runs([self.experiment_id],
                                  filter_string=f"tags.`cram_ray.run_name` = '{name}' and tags.`{TAG_KIND}` = '{self.kind}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def finish(self, status: str = "FINISHED") -> None:
        """Close the stream's run with ``status`` (FINISHED, FAILED or KILLED)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"finish: status expected one of {', '.join(RUN_STATUSES)}, got {status!r}")
        if self._root.active:
            self._client.set_terminated(self._root.run_id, status=status)

    def __enter__(self) -> "StreamTracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    # ---- logging into the stream's run -----------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Stream-level metrics (e.g. MAA after task ``step``); see :func:`flatten_metrics`."""
        self._root.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        return self._root.log_params(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._root.set_tags(tags)

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        self._root.log_artifact(path, artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._root.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._root.log_text(text, artifact_file)

    # ---- nested task runs ------------------------------------------------------------------

    def _task_run_id(self, task_index: int, task_name: str) -> str:
        client = self._client
        parent = self._root.run_id
        found = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{parent}' and tags.`{TAG_TASK_INDEX}` = '{task_index}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(
            self.experiment_id, run_name=f"task_{task_index}_{task_name}",
            tags={TAG_PARENT: parent, TAG_KIND: "task", TAG_TASK_INDEX: str(task_index), "cram_ray.task": task_name},
        )
        RunLogger(client, run.info.run_id).log_params({"task.index": task_index, "task.name": task_name})
        return run.info.run_id

    @contextlib.contextmanager
    def task_run(self, task_index: int, task_name: str) -> Iterator[RunLogger]:
        """A nested child run for one task, yielded as a :class:`RunLogger`.

        Closed FINISHED on normal exit and FAILED if the block raises (the error propagates). On a
        resumed stream the task's existing child run is reopened rather than duplicated.
        """
        if not self._root.active:
            yield RunLogger(None, None)
            return
        run_id = self._task_run_id(task_index, task_name)
        try:
            yield RunLogger(self._client, run_id)
        except BaseException:
            self._client.set_terminated(run_id, status="FAILED")
            raise
        self._client.set_terminated(run_id, status="FINISHED")


class ParentRun:
    """The MLflow run that groups several streams (a comparison, a Tune study); reopened by name
    on resume. The streams' runs show under it once :meth:`adopt` tags them (or they are created
    with ``mlflow.parentRunId`` set). A no-op with tracking disabled."""

    def __init__(self, cfg: Any, storage_dir: PathLike, name: str, params: Mapping[str, Any], *, kind: str,
                 artifact_location: Optional[str] = None) -> None:
        self.tracker = StreamTracker(cfg.tracking, storage_dir, name, kind=kind, artifact_location=artifact_location)
        if self.tracker.enabled:
            self.tracker.resume_run_id = self.tracker.find_run(name)
        self.run_id = self.tracker.start(params)

    def adopt(self, child_run_id: Optional[str]) -> None:
        """Show a stream's run under this one in the MLflow UI (a run this store does not hold, such
        as a stream whose summary was kept but whose tracking store was not, is left out)."""
        if self.run_id and child_run_id:
            from mlflow.exceptions import MlflowException

            client = self.tracker._connect()
            try:
                client.get_run(child_run_id)
            except MlflowException:
                return
            client.set_tag(child_run_id, TAG_PARENT, self.run_id)

    def finish(self, metrics: Mapping[str, Any], files: list[Path]) -> None:
        self.tracker.log_metrics(metrics)
        for f in files:
            self.tracker.log_artifact(f)
        self.tracker.finish("FINISHED")

    def fail(self) -> None:
        self.tracker.finish("FAILED")
