"""A two-node Ray cluster on this machine, storage on a local S3 server: what a real cluster does.

One head and one worker node (``ray start``, own ports and temp dirs, tests/ray_procs.py) with 3
logical CPUs each; Train workers ask for 2 CPUs, so two of them can only run one per node, and
each node keeps a CPU for Ray Data. Drivers attach by address (``train.ray_address``) and keep
the run's ledger, shards and Train checkpoints on the moto S3 server (tests/s3_server.py).

The tests share the cluster and one two-worker stream (the baseline, whose driver is killed and
rerun after training), and run in file order: the last one kills the worker node. Run them under the machine's Ray lock::

    flock /tmp/cram-ray.lock pytest -m ray tests/multinode
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_procs import add_worker, pids_of, start_head, stop  # noqa: E402
from s3_server import list_keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "workflows/configs/smoke.yaml")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]

# One task, 30 steps (6 probe + 24 train) with a checkpoint every 5: a node can be lost mid-train.
# The exact ingest gives every step the same global batch whatever the world size, so the elastic
# run can be compared with the undisturbed one tensor by tensor.
STREAM = ["data.builtin.tasks=[count]", "train.steps_per_task=30", "train.checkpoint_every=5",
          "train.zero_stage=2", "train.cpus_per_worker=2", "tracking.enabled=false", "train.ingest=exact"]
# The head declares a dead node within ~3 s instead of Ray's default ~30 s. Ray Data's
# AutoscalingCoordinator, which sizes an elastic group, still lists the node for up to 20 s after;
# a group sized for it cannot be placed and is retried after the start timeout (60 s by default).
FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
# An elastic restart on one worker averages one gradient over the whole batch where two workers
# averaged two half-batch means: the runs differ a little (docs/multinode.md). Per cell of the
# accuracy matrix, at most this many test items may flip.
FLIPPED_ITEMS = 2
TEST_ITEMS = 16  # data.builtin.test_per_task of the smoke preset
TIMEOUT = 900


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """(head, worker) nodes; the nodes inherit the S3 endpoint from the session's environment."""
    tmp = tmp_path_factory.mktemp("cluster")
    head = start_head(tmp, num_cpus=3, env={**os.environ, **FAST_HEALTH})
    nodes = [head]
    try:
        nodes.insert(0, add_worker(head, tmp, num_cpus=3, name="worker"))
        yield head, nodes[0]
    finally:
        stop(*nodes)


def driver_env(head) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **head.client_env(), "PYTHONUNBUFFERED": "1"}


def stream_argv(head, storage: str, out: Path, run_id: str, cache_dir: str, *sets: str) -> list[str]:
    argv = [sys.executable, str(ROOT / "workflows/stream.py"), "--config", SMOKE, "--executor", "ray",
            "--out", str(out), "--run-id", run_id]
    for item in (f"train.ray_address={head.address}", f"storage={storage}", f"data.cache_dir={cache_dir}",
                 *STREAM, *sets):
        argv += ["--set", item]
    return argv


def run(argv, head, log: Path) -> dict:
    """Run a driver to the end; its summary.json."""
    with log.open("w") as out:
        result = subprocess.run(argv, cwd=ROOT, env=driver_env(head), stdout=out, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT, start_new_session=True)
    assert result.returncode == 0, log.read_text()[-4000:]
    return json.loads((Path(argv[argv.index("--out") + 1]) / "summary.json").read_text())


class Driver:
    """A driver in its own process group, SIGKILLed (group and all) on exit if still running."""

    def __init__(self, argv, head, log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=driver_env(head), stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, what: str, ready, timeout: float = TIMEOUT, every: float = 0.3):
        deadline = time.time() + timeout
        while not (found := ready()):
            assert self.proc.poll() is None, f"the driver ended before {what}:\n{self.log.read_text()[-4000:]}"
            assert time.time() < deadline, f"no {what} within {timeout:.0f}s"
            time.sleep(every)
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def done_markers(endpoint: str, storage: str, run_id: str) -> set[str]:
    """``task_<t>/<stage>`` of every stage the S3 ledger holds a ``_DONE.json`` for."""
    keys = list_keys(endpoint, f"{storage}/{run_id}")
    return {k.rsplit("/", 1)[0] for k in keys if k.endswith("/_DONE.json") and k.startswith("task_")}


def read_text(endpoint: str, uri: str) -> str:
    """An S3 object's text, "" while it does not exist."""
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return ""


def stage_state(endpoint: str, storage: str, run_id: str, stage: str) -> dict[str, np.ndarray]:
    """The tensors a committed stage saved (safetensors files of its directory, read from S3)."""
    import boto3

    bucket, _, prefix = storage[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out: dict[str, np.ndarray] = {}
    for key in list_keys(endpoint, f"{storage}/{run_id}/task_0/{stage}"):
        if key.endswith(".safetensors"):
            blob = s3.get_object(Bucket=bucket, Key=f"{prefix}/{run_id}/task_0/{stage}/{key}")["Body"].read()
            path = Path(f"/tmp/cram-mn-{os.getpid()}.safetensors")
            path.write_bytes(blob)
            try:
                out.update({f"{key}:{k}": v for k, v in load_file(str(path)).items()})
            finally:
                path.unlink()
    return out


def train_worker_nodes(head) -> list[str]:
    """Node ids of every Ray Train worker actor the cluster has run (alive or dead)."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                         limit=1000, raise_on_missing_output=False)
    return [a.node_id for a in actors]


@pytest.fixture(scope="module")
def baseline(cluster, s3_server, cache_dir, tmp_path_factory):
    """Two Train workers, ZeRO-2: the driver is SIGKILLed once the S3 ledger holds the train stage,
    then the same command finishes the stream. Training itself ran undisturbed: this is also the
    elastic test's reference."""
    head, _ = cluster
    tmp = tmp_path_factory.mktemp("baseline")
    storage, run_id = "s3://cram-test/multinode-baseline", "base"
    # aggregate and evaluate as stages of their own (Ray Data pools), so there is a moment to kill the
    # driver between train and them; inside the Train run they would follow train within seconds
    argv = stream_argv(head, storage, tmp / "out", run_id, cache_dir, "train.num_workers=2", "train.fuse_eval=false")
    with Driver(argv, head, tmp / "first.log") as driver:
        done = driver.wait_for("committed train stage", lambda: (
            d if "task_0/train" in (d := done_markers(s3_server, storage, run_id)) else None))
    summary = run(argv, head, tmp / "second.log")
    return {"summary": summary, "done_before_kill": done, "storage": storage, "run_id": run_id}


def test_two_train_workers_run_one_per_node_with_zero2(cluster, baseline, s3_server):
    head, _ = cluster
    nodes = train_worker_nodes(head)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker per node, the only Train run so far
    assert {"task_0/probe", "task_0/allocate", "task_0/train", "task_0/evaluate"} <= done_markers(
        s3_server, baseline["storage"], baseline["run_id"])
    assert len(baseline["summary"]["accuracy_matrix"]) == 1


def test_killed_driver_resumes_from_the_s3_ledger(baseline):
    done, rerun = baseline["done_before_kill"], set(baseline["summary"]["stages_run"])
    assert "task_0/evaluate" not in done
    assert "task_0/evaluate" in rerun and not rerun & done, (rerun, done)  # what was left, nothing finished


def _terminated(study: Path) -> list[str]:
    """Trials Tune's experiment snapshot records as TERMINATED (what a restore keeps)."""
    states = list((study / "study").glob("experiment_state*.json"))
    try:
        data = json.loads(states[0].read_text()) if states else {}
    except ValueError:  # caught mid-write
        return []
    trials = (json.loads(entry[0]) for entry in data.get("trial_data", []))
    return sorted(t["trial_id"] for t in trials if t.get("status") == "TERMINATED")


def test_killed_tune_study_is_restored_on_the_cluster(cluster, cache_dir, tmp_path):
    head, _ = cluster
    out = tmp_path / "study"
    argv = [sys.executable, str(ROOT / "workflows/tune.py"), "--config", SMOKE, "--out", str(out),
            "--num-samples", "2", "--executor", "local"]
    for item in (f"train.ray_address={head.address}", f"data.cache_dir={cache_dir}", "tune.scheduler=none",
                 "data.builtin.tasks=[count]", "tracking.enabled=false",
                 'tune.search_space={"method.cram.rank_max": {"type": "choice", "values": [1, 2]}}'):
        argv += ["--set", item]
    with Driver(argv, head, tmp_path / "first.log") as driver:
        finished = driver.wait_for("finished trial", lambda: _terminated(out), every=1.0)
    # Tune saves its experiment state periodically: the second trial may be recorded as finished in
    # the same save as the first; either way the restored study must run none of them again
    assert 1 <= len(finished) <= 2
    stamps = {t: (out / "trials" / t / "summary.json").stat().st_mtime_ns for t in finished}
    log = tmp_path / "second.log"
    with log.open("w") as fh:
        result = subprocess.run(argv, cwd=ROOT, env=driver_env(head), stdout=fh, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT, start_new_session=True)
    assert result.returncode == 0, log.read_text()[-4000:]
    assert "resuming the study" in log.read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    for trial, stamp in stamps.items():  # the finished trial was not run again
        assert (out / "trials" / trial / "summary.json").stat().st_mtime_ns == stamp


def test_elastic_run_survives_the_loss_of_a_node(cluster, baseline, s3_server, cache_dir, tmp_path):
    head, worker = cluster
    base_summary, base_storage, base_run = baseline["summary"], baseline["storage"], baseline["run_id"]
    storage, run_id = "s3://cram-test/multinode-elastic", "e"
    argv = stream_argv(head, storage, tmp_path / "out", run_id, cache_dir, "train.num_workers=[1, 2]",
                       "train.max_failures=1")
    snapshot = f"{storage}/{run_id}/train_runs/task_0/checkpoint_manager_snapshot.json"
    with Driver(argv, head, tmp_path / "driver.log") as driver:
        # a checkpoint counts once Ray Train registered it (every rank reported): its snapshot says so
        driver.wait_for("registered train checkpoint", lambda: "train-step" in read_text(s3_server, snapshot))
        assert "task_0/train" not in done_markers(s3_server, storage, run_id), "train ended before the kill"
        victims = pids_of(worker)  # its `ray start`, raylet, and every worker process it runs
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        driver.wait_for("end of the stream", lambda: driver.proc.poll() is not None)
        assert driver.proc.returncode == 0, driver.log.read_text()[-4000:]
    log = driver.log.read_text()
    assert "worker 0/2 ready" in log and "worker 0/1 ready" in log  # started on two, restarted on one
    assert "train: resuming at step" in log  # from the last checkpoint, not from scratch
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    got, want = np.array(summary["accuracy_matrix"], float), np.array(base_summary["accuracy_matrix"], float)
    assert got.shape == want.shape
    assert np.nanmax(np.abs(got - want)) <= 100.0 * FLIPPED_ITEMS / TEST_ITEMS + 1e-9, (got, want)
    # the adapters it trained are the undisturbed run's, up to the re-split batches' arithmetic
    mine, theirs = stage_state(s3_server, storage, run_id, "train"), stage_state(s3_server, base_storage,
                                                                               base_run, "train")
    assert mine.keys() == theirs.keys() and mine
    drift = {k: float(np.abs(mine[k] - theirs[k]).max()) / max(1e-8, float(np.abs(theirs[k]).max())) for k in mine}
    print(f"elastic vs undisturbed: accuracy {got.tolist()} vs {want.tolist()}, largest relative adapter "
          f"difference {max(drift.values()):.2e} ({max(drift, key=drift.get)})")
    assert max(drift.values()) <= 0.05, drift
