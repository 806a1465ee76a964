"""A Ray Tune study over stream hyperparameters: each trial is a whole (short) continual stream.

Layout of ``<out>/`` (a local directory or an object-store URI: Tune keeps its experiment state
there too, so a study on a cluster is restored from one place whichever node its driver runs on)::

    study/              Tune's experiment directory (what ``Tuner.restore`` reads)
    trials/<trial_id>/  each trial's stream: summary.json, plots, its stage ledger
    results.csv, results.md, pareto.png, best.yaml, study.json
    mlflow.db, mlartifacts/   (default tracking store, shared by the study and its trials; see
                              cram_ray.pipeline.outputs for a URI ``out``)

A trial is :func:`stream_trial`: the stream driver function of ``workflows/stream.py`` run inside a
Tune trial actor. With ``train.executor=ray`` it builds its own ``TorchTrainer`` runs per task (the
Train v2 pattern: Tune launches a driver function, the driver function builds the trainer); with
``local`` it trains in the trial's own process. After each task's evaluation it reports the running
MFT/MFN/MAA/BWT, the parameters added so far and the objective, so ASHA can stop a trial that lags
at the same task index. A trial's stream lives under a directory named by its trial id and keeps
its stage ledger there, so a trial restarted by ``Tuner.restore`` resumes at its first unfinished
stage; finished trials are not rerun.

MLflow: the study is one parent run; every trial's stream run is created as its child (tag
``mlflow.parentRunId``) with the full trial config as params, per-task metrics at step t and the
stream's artifacts; the parent gets the results table, the Pareto plot and ``best.yaml``.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from cram_ray.config import StreamConfig, config_hash, dump_config, from_dict
from cram_ray.pipeline.ledger import Storage
from cram_ray.pipeline.lock import HEARTBEAT_SECONDS, STALE_SECONDS, RunLock
from cram_ray.pipeline.outputs import tracking_place
from cram_ray.report.tables import markdown_table
from cram_ray.tune.objective import OBJECTIVE, check_metric, objective, results_csv
from cram_ray.tune.space import Dimension, apply_params, describe, parse_space, tune_domains

EXPERIMENT = "study"
STATUS_COMPLETE, STATUS_STOPPED, STATUS_ERROR = "complete", "stopped early", "error"


def trial_dir(out: str, trial_id: str) -> str:
    """A trial's stream location under the study's ``out`` (a directory or URI)."""
    return Storage(out).location(f"trials/{trial_id}")


def column_names(keys: list[str]) -> dict[str, str]:
    """Table columns for searched keys: the last part (``lambda_dec``) unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (n if last.count(n) == 1 else k) for k, n in zip(keys, last)}


# -- inside a trial ------------------------------------------------------------------------------
def stream_trial(config: dict[str, Any], *, base: dict[str, Any], out: str, tracking_uri: Optional[str],
                 parent_run_id: Optional[str], n_tasks: int) -> None:
    """One trial: apply the sampled values to the study's config and run the stream, reporting
    after every task. Runs in a Tune trial actor."""
    from ray import tune

    from cram_ray.pipeline.run import run_and_report

    trial_id = tune.get_context().get_trial_id()
    where = trial_dir(out, trial_id)
    cfg = apply_params(from_dict(base), config)
    cfg = cfg.replace(**{"storage": where, "tracking.uri": tracking_uri})
    tags = {"cram_ray.trial_id": trial_id, "cram_ray.study_dir": out}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    pending: dict[str, Any] = {}

    def progress(t: int, numbers: dict[str, Any]) -> None:
        metrics = {k: v for k, v in numbers.items() if isinstance(v, (int, float))}  # drops None and the task name
        metrics[OBJECTIVE] = objective(metrics, cfg.tune)
        metrics["trial_dir"] = where
        if t < n_tasks - 1:
            tune.report(metrics)
        else:  # the last report waits until summary.json and the MLflow run are written (below)
            pending.update(metrics)

    # a restored trial may start while its previous actor still exits: wait for that one's lock
    summary = run_and_report(cfg, out=where, run_id=f"trial-{trial_id}", on_task=progress, mlflow_tags=tags,
                             lock_wait=STALE_SECONDS + HEARTBEAT_SECONDS)
    pending["mlflow_run_id"] = summary.get("mlflow_run_id") or ""
    tune.report(pending)


# -- the study driver ----------------------------------------------------------------------------
class Study:
    """Builds (or restores) the Tuner for ``cfg`` under ``out`` and turns its results into files."""

    def __init__(self, cfg: StreamConfig, out: Union[str, Path], *, command: str = "",
                 log: Optional[Callable[[str], None]] = None):
        check_metric(cfg.tune)
        self.cfg = cfg
        self.out = Storage(str(out))
        self.place = tracking_place(cfg, self.out)
        self.dims: list[Dimension] = parse_space(cfg)
        self.command = command
        self.log = log or (lambda msg: print(msg, flush=True))
        self.n_tasks = self._task_count()

    def _task_count(self) -> int:
        if self.cfg.data.benchmark is None:
            return len(self.cfg.data.builtin.tasks)
        from cram_ray.data.manifest import load_benchmark

        return len(load_benchmark(self.cfg.data.benchmark).tasks)

    @property
    def name(self) -> str:
        """The study's MLflow run name: the same config and space give the same name (resume)."""
        tree = {"config": self.cfg.replace(**{"storage": ""}).to_dict(), "space": [d.__dict__ for d in self.dims]}
        return "tune-" + config_hash(tree)[:10]

    def _tracking(self) -> StreamConfig:
        """The config every trial logs with: the study's store unless one is configured."""
        if self.cfg.tracking.enabled and not self.cfg.tracking.uri:
            return self.cfg.replace(**{"tracking.uri": self.place.uri})
        return self.cfg

    def _searcher(self):
        tune_cfg = self.cfg.tune
        if tune_cfg.searcher == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tune_cfg.seed))
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=tune_cfg.seed)

    def _scheduler(self):
        tune_cfg = self.cfg.tune
        if tune_cfg.scheduler == "none":
            return None
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", max_t=self.n_tasks,
                             grace_period=min(tune_cfg.grace_tasks, self.n_tasks),
                             reduction_factor=tune_cfg.reduction_factor)

    def _trainable(self, cfg: StreamConfig, parent_run_id: Optional[str]):
        from ray import tune

        fn = tune.with_parameters(stream_trial, base=cfg.to_dict(), out=self.out.uri,
                                  tracking_uri=cfg.tracking.uri if cfg.tracking.enabled else None,
                                  parent_run_id=parent_run_id, n_tasks=self.n_tasks)
        return tune.with_resources(fn, {"cpu": cfg.tune.cpus_per_trial})

    def run(self) -> list[dict[str, Any]]:
        """Run or resume the study; returns the result rows (best first)."""
        with RunLock(self.out), tempfile.TemporaryDirectory(prefix="cram-study-") as tmp:
            # the reports are written locally (matplotlib, MLflow) and copied to out
            self.place.pull(self.out)
            try:
                return self._run(self.out.local_path("") or Path(tmp))
            finally:
                self.place.push(self.out)

    def _run(self, local: Path) -> list[dict[str, Any]]:
        from ray import tune

        from cram_ray.pipeline.ray_cluster import connect
        from cram_ray.tracking.mlflow_tracker import ParentRun

        local.mkdir(parents=True, exist_ok=True)
        cfg = self._tracking()
        parent = ParentRun(cfg, self.place.local_dir, self.name,
                           {"tune.space": describe(self.dims), "config": self.cfg.to_dict()}, kind="tune",
                           artifact_location=self.place.artifact_location)
        connect(cfg.train, self.log)
        path = self.out.location(EXPERIMENT)
        trainable = self._trainable(cfg, parent.run_id)
        t0 = time.time()
        try:
            # Tune reads a URI with pyarrow's filesystems, as Storage does (same credentials, endpoint)
            if tune.Tuner.can_restore(path):
                self.log(f"[tune] resuming the study at {path}")
                tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                           restart_errored=True)
            else:
                self.log(f"[tune] new study at {path}: {cfg.tune.num_samples} trials, searcher {cfg.tune.searcher}, "
                         f"scheduler {cfg.tune.scheduler}, objective {cfg.tune.metric} ({cfg.tune.mode})\n"
                         + describe(self.dims))
                tuner = tune.Tuner(
                    trainable,
                    param_space=tune_domains(self.dims),
                    tune_config=tune.TuneConfig(
                        metric=OBJECTIVE, mode=cfg.tune.mode, search_alg=self._searcher(),
                        scheduler=self._scheduler(), num_samples=cfg.tune.num_samples,
                        max_concurrent_trials=cfg.tune.max_concurrent_trials,
                    ),
                    run_config=tune.RunConfig(storage_path=self.out.uri, name=EXPERIMENT, verbose=1),
                )
            grid = tuner.fit()
            rows = self.rows(grid)
            files = self.report(rows, time.time() - t0, local)
            self.close_stopped_runs(cfg, rows)
        except BaseException:
            parent.fail()
            raise
        best = rows[0] if rows else {}
        parent.finish({"best_objective": best.get(OBJECTIVE, float("nan")), "trials": len(rows)}, files)
        return rows

    # -- results -------------------------------------------------------------------------------
    def rows(self, grid: Any) -> list[dict[str, Any]]:
        """One row per trial: its sampled values (after repair), last reported numbers and status."""
        rows = []
        for result in grid:
            metrics = dict(result.metrics or {})
            params = dict(result.config or {})
            effective = apply_params(self.cfg, params).flat()
            done = int(metrics.get("tasks_done", 0))
            if result.error is not None:
                status = STATUS_ERROR
            elif done >= self.n_tasks:
                status = STATUS_COMPLETE
            else:
                status = STATUS_STOPPED
            row: dict[str, Any] = {"trial": metrics.get("trial_id") or Path(str(result.path)).name, "status": status,
                                   "tasks_done": done}
            for key, column in column_names([d.key for d in self.dims]).items():
                row[column] = effective[key]
            for k in ("maa", "mfn", "bwt", "params_added_total", OBJECTIVE):
                row[k] = metrics.get(k)
            row["mlflow_run_id"] = metrics.get("mlflow_run_id")
            row["trial_dir"] = metrics.get("trial_dir")
            row["params"] = params
            rows.append(row)
        sign = 1.0 if self.cfg.tune.mode == "max" else -1.0

        def rank(row: dict[str, Any]) -> tuple:
            value = row.get(OBJECTIVE)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            return (row["status"] != STATUS_COMPLETE, not ok, -sign * value if ok else 0.0)

        rows.sort(key=rank)
        points = [(i, r) for i, r in enumerate(rows) if r["status"] == STATUS_COMPLETE
                  and r.get("params_added_total") is not None and r.get(OBJECTIVE) is not None]
        from cram_ray.report.plots import pareto_front

        front = pareto_front([{"x": r["params_added_total"], "y": sign * r[OBJECTIVE]} for _, r in points], "x", "y")
        for j, (i, _) in enumerate(points):
            rows[i]["pareto"] = j in front
        return rows

    def best_config(self, rows: list[dict[str, Any]]) -> Optional[StreamConfig]:
        """The best complete trial's config as a portable preset (no study paths in it)."""
        complete = [r for r in rows if r["status"] == STATUS_COMPLETE]
        if not complete:
            return None
        cfg = apply_params(self.cfg, complete[0]["params"])
        return cfg.replace(**{"storage": "", "tracking.uri": self.cfg.tracking.uri})

    def report(self, rows: list[dict[str, Any]], seconds: float, local: Path) -> list[Path]:
        """results.csv / results.md / pareto.png / best.yaml / study.json, written in the local
        directory ``local`` and copied to ``out``; returns the local files."""
        from cram_ray.report.plots import pareto_plot

        names = list(column_names([d.key for d in self.dims]).values())
        columns = ["trial", "status", "tasks_done", *names, "maa", "mfn", "bwt", "params_added_total", OBJECTIVE,
                   "pareto"]
        files = [local / "results.csv", local / "results.md"]
        files[0].write_text(results_csv(rows, columns))
        best = self.best_config(rows)
        lines = [
            f"# Study {self.name}", "",
            f"{len(rows)} trials ({sum(r['status'] == STATUS_COMPLETE for r in rows)} complete), "
            f"objective {self.cfg.tune.metric} ({self.cfg.tune.mode})"
            + (f", parameter budget {self.cfg.tune.param_budget}" if self.cfg.tune.param_budget else "")
            + f", {seconds:.0f} s this session.", "",
            "Search space:", "", *[f"- `{line}`" for line in describe(self.dims).splitlines()], "",
            markdown_table(rows, columns, ".4g", {"params_added_total": "params added", "tasks_done": "tasks"}),
            "`pareto`: no other complete trial adds fewer-or-equal parameters with a better-or-equal objective.",
        ]
        if self.command:
            lines += ["", f"Command: `{self.command}`"]
        files[1].write_text("\n".join(lines) + "\n")
        points = [{"params added": r["params_added_total"], self.cfg.tune.metric: r[OBJECTIVE], "label": r["trial"]}
                  for r in rows if r["status"] == STATUS_COMPLETE and r.get(OBJECTIVE) is not None]
        if points and self.cfg.tune.mode == "max":
            files.append(pareto_plot(points, "params added", self.cfg.tune.metric, local / "pareto.png",
                                     title=f"{self.cfg.tune.metric} vs parameters added ({len(points)} complete trials)"))
        if best is not None:
            dump_config(best, local / "best.yaml")
            files.append(local / "best.yaml")
        (local / "study.json").write_text(json.dumps({"name": self.name, "rows": rows}, indent=1, default=str))
        files.append(local / "study.json")
        for f in files:
            self.out.put_file(f, f.name)
        return files

    def close_stopped_runs(self, cfg: StreamConfig, rows: list[dict[str, Any]]) -> None:
        """A trial ASHA stopped leaves its stream's MLflow run open: mark it KILLED."""
        if not cfg.tracking.enabled:
            return
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        for row in rows:
            if row["status"] == STATUS_COMPLETE or not row.get("trial"):
                continue
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string=f"tags.`cram_ray.trial_id` = '{row['trial']}' and attributes.status = 'RUNNING'")
            for run in runs:
                client.set_tag(run.info.run_id, "cram_ray.stopped_by", cfg.tune.scheduler)
                client.set_terminated(run.info.run_id, status="KILLED")
