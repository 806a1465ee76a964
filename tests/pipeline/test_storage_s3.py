"""A run whose --out is an S3 URI, against a real S3 API (moto's server on localhost): everything
lands in the bucket, nothing in a local ``s3:`` directory, and a rerun resumes from the S3 ledger."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import list_keys

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))

import stream  # noqa: E402

from cram_ray.pipeline.ledger import STAGES, Storage  # noqa: E402

SMOKE = str(ROOT / "workflows/configs/smoke.yaml")


def test_stream_to_s3_writes_only_to_the_bucket_and_resumes_from_it(s3_server, s3_bucket, cache_dir, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = f"{s3_bucket}/run"
    argv = ["--config", SMOKE, "--method", "lora_ft", "--executor", "local", "--out", out, "--run-id", "t",
            "--set", f"data.cache_dir={cache_dir}", "--set", "data.builtin.tasks=[count,classify]"]
    assert stream.main(argv) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert out in final and "sqlite" in final and f"{out}/mlartifacts" in final
    assert list(tmp_path.iterdir()) == []  # no local "s3:" directory, nothing else either
    keys = list_keys(s3_server, out)
    for name in ("summary.json", "accuracy_matrix.png"):
        assert name in keys
    for t in range(2):
        for stage in STAGES:
            assert f"t/task_{t}/{stage}/_DONE.json" in keys
    assert "_LOCK.json" not in keys  # released at the end
    # MLflow: the sqlite store sits in the local cache, the run's artifacts in the bucket
    summary = json.loads(Storage(out).read_bytes("summary.json"))
    assert summary["mlflow_tracking_uri"].startswith(f"sqlite:///{cache_dir}/mlflow/")
    artifacts = [k for k in keys if k.startswith("mlartifacts/")]
    assert any(k.endswith(f"{summary['mlflow_run_id']}/artifacts/summary.json") for k in artifacts), artifacts
    assert any(k.endswith("experts/state.safetensors") for k in artifacts), artifacts
    # the sqlite store is copied beside the run; a machine without it in its cache starts from that copy
    assert "mlflow.db" in keys
    Path(summary["mlflow_tracking_uri"][len("sqlite:///"):]).unlink()

    # the same command again, in a process of its own (as on another machine)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "workflows/stream.py"), *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads(Storage(out).read_bytes("summary.json"))
    assert again["stages_run"] == []
    assert again["accuracy_matrix"] == summary["accuracy_matrix"]
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]  # the same MLflow run, reopened from the copy
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_compare_to_s3_writes_reports_and_streams_to_the_bucket_and_resumes(s3_server, s3_bucket, cache_dir,
                                                                             tmp_path, monkeypatch):
    import compare

    monkeypatch.chdir(tmp_path)
    out = f"{s3_bucket}/compare"
    argv = ["--config", SMOKE, "--executor", "local", "--methods", "lora_ft,oracle", "--out", out,
            "--set", f"data.cache_dir={cache_dir}", "--set", "data.builtin.tasks=[count]",
            "--set", "tracking.enabled=false"]
    assert compare.main(argv) == 0
    keys = list_keys(s3_server, out)
    for name in ("compare.json", "compare.md", "compare_bars.png", "accuracy_matrices.png",
                 "lora_ft/seed_0/summary.json", "oracle/seed_0/summary.json"):
        assert name in keys
    summaries = json.loads(Storage(out).read_bytes("compare.json"))
    assert [s["run_dir"] for s in summaries] == [f"{out}/lora_ft/seed_0", f"{out}/oracle/seed_0"]
    assert list(tmp_path.iterdir()) == []
    # a rerun reads the streams' summaries from the bucket; without its summary, a stream resumes
    # through its ledger there, every stage committed
    assert compare.main(argv) == 0
    assert json.loads(Storage(out).read_bytes("compare.json")) == summaries
    Storage(out).remove("oracle/seed_0/summary.json")
    assert compare.main(argv) == 0
    again = json.loads(Storage(out).read_bytes("compare.json"))
    assert again[0] == summaries[0] and again[1]["stages_run"] == []
    assert again[1]["accuracy_matrix"] == summaries[1]["accuracy_matrix"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.recovery
def test_tune_study_keeps_its_state_on_s3_and_restores_finished_trials(s3_server, s3_bucket, cache_dir,
                                                                       tmp_path, monkeypatch):
    import csv
    import io

    import ray
    import tune as tune_cli

    monkeypatch.chdir(tmp_path)
    out = f"{s3_bucket}/study"
    argv = ["--config", SMOKE, "--executor", "local", "--num-samples", "2", "--out", out,
            "--set", f"data.cache_dir={cache_dir}", "--set", "data.builtin.tasks=[count]",
            "--set", "tune.scheduler=none", "--set", "tracking.enabled=false",
            "--set", 'tune.search_space={"method.cram.rank_max": {"type": "choice", "values": [1, 2]}}']
    try:
        assert tune_cli.main(argv) == 0
        keys = list_keys(s3_server, out)
        assert any(k.startswith("study/experiment_state") for k in keys), keys
        rows = list(csv.DictReader(io.StringIO(Storage(out).read_bytes("results.csv").decode())))
        assert len(rows) == 2 and {r["status"] for r in rows} == {"complete"}
        summaries = {r["trial"]: Storage(out).read_bytes(f"trials/{r['trial']}/summary.json") for r in rows}
        assert {"results.md", "best.yaml", "study.json"} <= set(keys)
        # a second run restores the study from the bucket: the finished trials are kept, not rerun
        ray.shutdown()
        assert tune_cli.main(argv) == 0
        again = list(csv.DictReader(io.StringIO(Storage(out).read_bytes("results.csv").decode())))
        assert {r["trial"] for r in again} == set(summaries)
        for trial, blob in summaries.items():
            assert Storage(out).read_bytes(f"trials/{trial}/summary.json") == blob
        assert list(tmp_path.iterdir()) == []
    finally:
        ray.shutdown()
