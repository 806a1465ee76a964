"""StreamTracker against a real sqlite MLflow store in a temp dir, read back through MlflowClient.

MLflow's import and the sqlite schema migration cost seconds, so one stream is built once per
module and the tests read it from different angles.
"""
import pytest

from cram_ray.config import TrackingConfig
from cram_ray.tracking.mlflow_tracker import (
    MAX_PARAM_VALUE, TRUNCATED, StreamTracker, default_tracking_uri, flatten_metrics, flatten_params,
)

# sqlalchemy deprecation inside mlflow's own store, not ours
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

LONG = "x" * 7000
PARAMS = {
    "method": {"name": "cram", "target_modules": ["q_proj", "v_proj"], "cram": {"rank_max": 8}},
    "train": {"lr": 0.002, "ray_address": None},
    "tune": {"search_space": {}},
    "notes": LONG,
}


def test_flatten_params():
    flat = flatten_params(PARAMS)
    assert flat["method.name"] == "cram"
    assert flat["method.target_modules"] == '["q_proj","v_proj"]'
    assert flat["method.cram.rank_max"] == "8"
    assert flat["train.lr"] == "0.002"
    assert flat["train.ray_address"] == "None"
    assert flat["tune.search_space"] == "{}"
    assert len(flat["notes"]) == MAX_PARAM_VALUE and flat["notes"].endswith(TRUNCATED)
    assert flatten_params({"bad key=(1)": True}) == {"bad key__1_": "True"}
    assert all(isinstance(v, str) for v in flat.values())


def test_flatten_metrics():
    got = flatten_metrics({"maa": 50, "row": [1.0, 2], "stage_seconds": {"probe": 1.5}, "routing": None})
    assert got == {"maa": 50.0, "row.0": 1.0, "row.1": 2.0, "stage_seconds.probe": 1.5}
    with pytest.raises(TypeError, match="'method'"):
        flatten_metrics({"method": "cram"})


def test_default_uri_is_absolute_sqlite(tmp_path):
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_tracking_uri(tmp_path).startswith("sqlite:////")


def test_disabled_tracker_writes_nothing(tmp_path):
    store = tmp_path / "store"
    tr = StreamTracker(TrackingConfig(enabled=False), store, "run")
    assert tr.start(PARAMS) is None
    tr.log_metrics({"maa": 1.0}, step=0)
    tr.log_dict({"a": 1}, "a.json")
    tr.log_artifact(tmp_path / "missing.txt")
    with tr.task_run(0, "choice") as task:
        task.log_metrics({"acc": 1.0}, step=0)
    assert tr.find_run() is None
    tr.finish()
    assert tr.run_id is None
    assert not store.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A two-task stream, interrupted after task 0 and resumed for task 1 in a second tracker."""
    root = tmp_path_factory.mktemp("mlflow")
    storage = root / "storage"
    cfg = TrackingConfig(experiment="cram_ray-test")
    files = root / "files"
    (files / "plots").mkdir(parents=True)
    (files / "summary.json").write_text('{"maa": 50}')
    (files / "plots" / "acc.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")

    first = StreamTracker(cfg, storage, "stream-a")
    run_id = first.start(PARAMS)
    first.log_metrics({"maa": 80.0, "bwt": 0.0}, step=0)
    with first.task_run(0, "choice") as task:
        task.log_metrics({"acc": 0.5}, step=0)
        task.log_metrics({"acc": 0.8}, step=1)
        task.log_dict({"ranks": {"l0": 4}}, "ranks.json")
    with pytest.raises(RuntimeError):
        with first.task_run(1, "ocr") as task:
            task.log_metrics({"acc": 0.1}, step=0)
            raise RuntimeError("worker died")
    first.finish("FAILED")

    second = StreamTracker(cfg, storage, "stream-a", resume_run_id=first.find_run())
    changed = dict(PARAMS, train={"lr": 0.001, "ray_address": None})  # must not crash MLflow
    resumed_id = second.start(changed)
    with second.task_run(1, "ocr") as task:
        task.log_metrics({"acc": 0.9}, step=1)
    second.log_metrics({"maa": 70.0, "bwt": -5.0, "routing_accuracy": None}, step=1)
    second.log_artifact(files / "summary.json")
    second.log_artifact(files / "plots", artifact_path="plots")
    second.finish()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=second.uri)
    return {"client": client, "run_id": run_id, "resumed_id": resumed_id, "first": first,
            "second": second, "storage": storage}


def test_stream_run_params_and_metrics(stream):
    client, run_id = stream["client"], stream["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "stream-a"
    params = run.data.params
    assert params["method.name"] == "cram"
    assert params["method.cram.rank_max"] == "8"
    assert params["notes"].endswith(TRUNCATED) and len(params["notes"]) == MAX_PARAM_VALUE
    maa = [(m.step, m.value) for m in client.get_metric_history(run_id, "maa")]
    assert sorted(maa) == [(0, 80.0), (1, 70.0)]
    assert "routing_accuracy" not in run.data.metrics


def test_resume_appends_to_the_same_run(stream):
    client, run_id = stream["client"], stream["run_id"]
    assert stream["resumed_id"] == run_id
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.002"  # the first value stays
    assert run.data.tags["resumed_param.train.lr"] == "0.001"
    assert run.data.tags["cram_ray.resumes"] == "1"
    # one experiment, created once with the artifact root under storage; one stream run in it
    assert stream["first"].experiment_id == stream["second"].experiment_id
    exp = client.get_experiment(stream["first"].experiment_id)
    assert exp.artifact_location == (stream["storage"].resolve() / "mlartifacts").as_uri()
    streams = client.search_runs([exp.experiment_id], filter_string="tags.`cram_ray.kind` = 'stream'")
    assert [r.info.run_id for r in streams] == [run_id]


def test_nested_task_runs(stream):
    client, run_id = stream["client"], stream["run_id"]
    exp_id = stream["first"].experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  order_by=["attributes.start_time ASC"])
    # task 1's failed child run was reopened on resume, not duplicated
    assert [r.info.run_name for r in children] == ["task_0_choice", "task_1_ocr"]
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED"]
    t0, t1 = (r.info.run_id for r in children)
    assert [(m.step, m.value) for m in client.get_metric_history(t0, "acc")] == [(0, 0.5), (1, 0.8)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(t1, "acc")) == [(0, 0.1), (1, 0.9)]
    assert client.get_run(t1).data.params == {"task.index": "1", "task.name": "ocr"}
    assert [f.path for f in client.list_artifacts(t0)] == ["ranks.json"]


def test_artifacts_on_disk(stream):
    client, run_id = stream["client"], stream["run_id"]
    top = {f.path for f in client.list_artifacts(run_id)}
    assert top == {"params.json", "summary.json", "plots"}
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/acc.png"]
    art_dir = stream["storage"] / "mlartifacts"
    on_disk = {p.name for p in art_dir.rglob("*") if p.is_file()}
    assert {"params.json", "summary.json", "acc.png", "ranks.json"} <= on_disk
    assert (stream["storage"] / "mlflow.db").is_file()


def test_resume_unknown_run_is_a_clear_error(stream):
    cfg = TrackingConfig(experiment="cram_ray-test")
    tr = StreamTracker(cfg, stream["storage"], "x", resume_run_id="0" * 32)
    with pytest.raises(ValueError, match="cannot resume MLflow run"):
        tr.start({})
