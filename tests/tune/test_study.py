"""Ray Tune studies end to end on the smoke preset: the files a study promises, a best preset that
runs, and resuming after the driver is killed without rerunning finished trials."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))

import tune as tune_cli  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMOKE = str(ROOT / "workflows/configs/smoke.yaml")
SPACE = ('tune.search_space={"method.cram.lambda_dec": {"type": "loguniform", "low": 0.1, "high": 10}, '
         '"method.cram.rank_max": {"type": "choice", "values": [1, 2, 4]}}')


def study_args(out, cache_dir, *extra):
    return ["--config", SMOKE, "--out", str(out), "--set", f"data.cache_dir={cache_dir}", "--set", SPACE, *extra]


@pytest.fixture
def no_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def test_four_trial_study_writes_table_plot_and_a_runnable_best_preset(tmp_path, cache_dir, no_ray):
    out = tmp_path / "study"
    assert tune_cli.main(study_args(out, cache_dir, "--num-samples", "4", "--executor", "local")) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    complete = [r for r in rows if r["status"] == "complete"]
    assert complete, rows
    for r in rows:
        assert 1 <= int(r["tasks_done"]) <= 3
        assert float(r["rank_max"]) in (1, 2, 4) and 0.1 <= float(r["lambda_dec"]) <= 10
        assert float(r["objective"]) == pytest.approx(float(r["maa"]))  # no budget: objective is MAA
    for r in complete:  # a complete trial's numbers are its stream's summary.json
        summary = json.loads((out / "trials" / r["trial"] / "summary.json").read_text())
        assert float(r["maa"]) == pytest.approx(summary["maa"])
        assert int(float(r["params_added_total"])) == summary["params_added_total"]
    # on the front: no complete trial is both cheaper (or equal) and better (or equal)
    front = [r for r in complete if r["pareto"] == "True"]
    assert front
    for f in front:
        assert not any(float(o["params_added_total"]) <= float(f["params_added_total"])
                       and float(o["objective"]) > float(f["objective"]) for o in complete)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table.count("\n| ") >= 5 and "lambda_dec" in table
    # the best preset is the best complete trial's config and runs as is
    import stream

    from cram_ray.config import load_config

    best = load_config(out / "best.yaml")
    top = complete[0]
    assert best.method.cram.rank_max == int(float(top["rank_max"]))
    assert best.method.cram.lambda_dec == pytest.approx(float(top["lambda_dec"]))
    assert best.storage == "" and best.tracking.uri is None
    assert stream.main(["--config", str(out / "best.yaml"), "--executor", "local", "--out", str(tmp_path / "best"),
                        "--set", "data.builtin.tasks=[count]", "--set", "tracking.enabled=false"]) == 0
    # MLflow: one parent run for the study, each trial's stream run nested under it
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("cram_ray.kind") == "tune"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["cram_ray.trial_id"] for r in children} == {r["trial"] for r in rows}
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "results.md", "pareto.png", "best.yaml"} <= artifacts


def test_a_trial_builds_its_own_torchtrainer_runs(tmp_path, cache_dir, no_ray):
    """--executor ray: the trial's stream trains in TorchTrainer runs launched from inside the trial
    (outside the trial's placement group, so the Train workers' Ray Data tasks can be scheduled)."""
    out = tmp_path / "study"
    assert tune_cli.main(study_args(out, cache_dir, "--num-samples", "1", "--executor", "ray",
                                    "--set", "data.builtin.tasks=[count]", "--set", "tune.scheduler=none",
                                    "--set", "tracking.enabled=false")) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "complete"
    trial = out / "trials" / rows[0]["trial"]
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["stage_seconds"]["startup"] > 0  # measured start-up of a Train run: only the Ray executor has one
    runs = [p for p in trial.rglob("*") if p.is_dir() and p.name == "task_0" and p.parent.name == "train_runs"]
    assert runs, "no Ray Train run directory under the trial's storage"
    assert float(rows[0]["objective"]) == pytest.approx(summary["maa"])


def _terminated(out: Path) -> list[str]:
    """Ids of the trials Tune's last experiment snapshot records as TERMINATED: what a restore
    treats as finished. A trial may already have written summary.json without being recorded so
    (its final report still in flight); a restore rightly runs that one again."""
    states = list((out / "study").glob("experiment_state*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[0].read_text())
    except ValueError:  # caught mid-write
        return []
    trials = (json.loads(entry[0]) for entry in data.get("trial_data", []))
    return sorted(t["trial_id"] for t in trials if t.get("status") == "TERMINATED")


@pytest.mark.recovery
def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path, cache_dir, no_ray):
    out = tmp_path / "study"
    argv = [sys.executable, str(ROOT / "workflows/tune.py"),
            *study_args(out, cache_dir, "--num-samples", "3", "--executor", "local", "--set", "tune.scheduler=none",
                        "--set", "tracking.enabled=false")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while not (finished := _terminated(out)):
            assert proc.poll() is None, "the study ended before it could be interrupted"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(1.0)
        assert 1 <= len(finished) < 3
        assert all((out / "trials" / t / "summary.json").is_file() for t in finished)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, no clean shutdown
        proc.wait()
    stamps = {t: (out / "trials" / t / "summary.json").stat().st_mtime_ns for t in finished}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the study" in result.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 and all(r["status"] == "complete" for r in rows)
    for t, stamp in stamps.items():  # finished trials were not run again
        assert (out / "trials" / t / "summary.json").stat().st_mtime_ns == stamp
    assert len(list((out / "trials").glob("*/summary.json"))) == 3
