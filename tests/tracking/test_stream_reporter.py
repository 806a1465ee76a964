"""What the driver's StreamReporter puts in MLflow for a two-task stream fed synthetic stage results:
loss curves by step, ranks as a file rather than metric keys, final metrics at the last task's step,
and which code made the run."""
import csv
import io
import json
import subprocess
from pathlib import Path

import pytest

from cram_ray.config import StreamConfig
from cram_ray.pipeline.context import TaskMeta
from cram_ray.pipeline.ledger import STAGES, StageResult, Storage
from cram_ray.pipeline.outputs import tracking_place
from cram_ray.pipeline.track import StreamReporter, rank_table
from cram_ray.tracking import provenance

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

TASKS = [TaskMeta("choice", "exact", 8, 4, "datasets/d"), TaskMeta("ocr", "exact", 8, 4, "datasets/d")]
LAYERS = [f"model.language_model.layers.{b}.self_attn.{m}" for b in range(32) for m in ("q_proj", "v_proj")]


def results(t):
    per_layer = {name: 2 + t for name in LAYERS}
    reports = {
        "probe": {"steps": 2, "loss": {"ce": 3.0}, "curve": {"step": [1, 2], "loss": [3.5, 3.0]}},
        "allocate": {"slot": t, "per_layer": per_layer, "rank_max": 2 + t},
        "train": {"steps": 6, "loss": {"ce": 1.0}, "curve": {"step": [2, 4, 6], "loss": [2.0, 1.5, 1.0 - t / 10]}},
        "aggregate": {"params_added": 100 * (t + 1), "ranks": {"per_layer": per_layer, "rank_max": 2 + t}},
        "evaluate": {"row": [80.0, 60.0][: t + 1]},
    }
    return {s: StageResult(s, t, reports[s], 1.0, 0.1) for s in STAGES}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    cfg = StreamConfig().replace(**{"storage": str(out)})
    reporter = StreamReporter(cfg, tracking_place(cfg, Storage(str(out))), "run-a", None)
    rows = []
    for t in range(2):
        res = results(t)
        for s in STAGES:
            reporter.stage_done(res[s], TASKS)
        rows.append(res["evaluate"].metrics["row"])
        reporter.task_done(t, TASKS, res, rows)
    summary = {"tasks": [t.name for t in TASKS], "mft": 70.0, "mfn": 70.0, "maa": 75.0, "bwt": -20.0,
               "params_added_total": 300, "ranks": [results(t)["aggregate"].metrics["ranks"] for t in range(2)]}
    (out / "summary.json").write_text(json.dumps(summary))
    reporter.finish(summary, out, Storage(str(out)), "run-a", out / "scratch")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=reporter.tracker.uri)
    children = client.search_runs([reporter.tracker.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{reporter.run_id}'")
    by_task = {int(r.data.tags["cram_ray.task_index"]): r.info.run_id for r in children}
    return {"client": client, "run_id": reporter.run_id, "tasks": by_task}


def test_loss_curves_are_logged_by_step_in_each_task_run(logged):
    client = logged["client"]
    for t, run_id in logged["tasks"].items():
        history = client.get_metric_history(run_id, "train.loss")
        assert [(m.step, m.value) for m in history] == [(2, 2.0), (4, 1.5), (6, 1.0 - t / 10)]
        assert [m.step for m in client.get_metric_history(run_id, "probe.loss")] == [1, 2]


def test_per_layer_ranks_are_a_file_not_metric_keys(logged):
    client = logged["client"]
    run_id = logged["tasks"][1]
    keys = client.get_run(run_id).data.metrics
    assert not any("per_layer" in k or "layers." in k for k in keys)
    assert keys["aggregate.ranks.rank_max"] == 3 and keys["allocate.rank_max"] == 3
    for stage in ("allocate", "aggregate"):
        ranks = json.loads(Path(client.download_artifacts(run_id, f"ranks/{stage}.json")).read_text())
        assert ranks == {name: 3 for name in LAYERS}
    table = list(csv.reader(io.StringIO(Path(client.download_artifacts(logged["run_id"], "ranks.csv")).read_text())))
    assert table[0] == ["layer", "choice", "ocr"] and len(table) == 1 + len(LAYERS)
    assert table[1] == [LAYERS[0], "2", "3"]


def test_final_metrics_are_at_the_last_tasks_step(logged):
    client = logged["client"]
    history = client.get_metric_history(logged["run_id"], "mfn")
    assert max(m.step for m in history) == 1
    assert [m.value for m in history if m.step == 1][-1] == 70.0
    assert all(m.step >= 0 for m in history) and history[0].step == 0


def test_run_records_code_revision_config_and_environment(logged):
    client = logged["client"]
    run = client.get_run(logged["run_id"])
    code = provenance.code_revision()
    head = subprocess.run(["git", "-C", str(provenance.PACKAGE_DIR), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert code["git_commit"] == (head or None)
    assert run.data.tags.get("mlflow.source.git.commit") == code["git_commit"]
    assert run.data.tags["cram_ray.version"] == code["version"]
    files = {f.path for f in client.list_artifacts(logged["run_id"])}
    assert {"config.yaml", "environment.json", "summary.json", "ranks.csv"} <= files
    env = json.loads(Path(client.download_artifacts(logged["run_id"], "environment.json")).read_text())
    assert env["code"] == code and "torch" in env["packages"]


def test_rank_table_is_empty_without_ranks():
    assert rank_table({"tasks": ["a"], "ranks": [{}]}) == ""
