"""A `ray start` cluster on this machine is joined only when named, and then runs the driver's code.

One head per module (tests/ray_procs.py): its own ports and temp dir, loopback only, no token,
started without this checkout on PYTHONPATH, so its workers would import whatever cram_ray the
environment has installed unless the driver ships its own. Drivers (attach_probe.py, a Train
script) run as subprocesses from /, as a user's script would.
"""
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ray_procs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray
MARK = "ATTACH_TEST_HEAD"  # a resource only the test head has

PROBE = Path(__file__).with_name("attach_probe.py")


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket on the loopback
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def driver_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", RAY_AUTH_TOKEN_PATH=str(tmp_path / "auth_token"), **extra)
    return env


def run_probe(tmp_path, *args, **env) -> dict:
    result = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "out"), *args], cwd="/",
                            env=driver_env(tmp_path, **env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attach")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    node = ray_procs.start_head(tmp, num_cpus=2, resources={MARK: 1}, env=env)
    try:
        yield node
    finally:
        ray_procs.stop(node)
        assert not ray_procs.pids_of(node)


def test_a_running_cluster_is_not_joined_unless_named(head, tmp_path):
    seen = run_probe(tmp_path)
    assert seen["mode"] == "local" and MARK not in seen["resources"] and seen["gcs"] != head.address
    # the embedded cluster is private to this machine
    assert seen["nodes"] == ["127.0.0.1"] and seen["remote"]["ip"] == "127.0.0.1"
    assert seen["gcs"].startswith("127.0.0.1:") and seen["listening"]
    assert all(loopback(ip) for ip in seen["listening"]), seen["listening"]
    token = tmp_path / "auth_token"
    assert token.exists() and token.stat().st_mode & 0o077 == 0


def test_named_cluster_is_joined_and_runs_the_drivers_code(head, tmp_path):
    seen = run_probe(tmp_path, "--address", head.address)
    assert seen["mode"] == "address" and seen["resources"].get(MARK) == 1
    remote = seen["remote"]
    # the worker imported the package the driver shipped, unpacked in the head's session dir
    assert Path(remote["file"]).is_relative_to(head.temp_dir), remote["file"]
    assert "py_modules" in remote["file"] and not remote["file"].startswith(str(ROOT))
    assert remote["source"] == (ROOT / "cram_ray/pipeline/ray_cluster.py").read_text()
    assert remote["offline"] == "1"


def test_ray_address_env_names_the_cluster_too(head, tmp_path):
    seen = run_probe(tmp_path, RAY_ADDRESS=head.address)
    assert seen["mode"] == "address" and seen["resources"].get(MARK) == 1


TRAIN = """
import argparse, sys, time
from pathlib import Path
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from cram_ray.cli import add_config_flags, resolve_config
from cram_ray.pipeline.ray_cluster import connect

parser = add_config_flags(argparse.ArgumentParser(), out=sys.argv[1], out_help="")
cfg = resolve_config(parser.parse_args(sys.argv[3:]))
connect(cfg.train, log=lambda line: None)
marker = sys.argv[2]

def loop(config):
    Path(marker).write_text("up")
    time.sleep(600)

TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(storage_path=sys.argv[1], name="killed")).fit()
"""

LEFT = """
import json, sys
import ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False)
actors = [a.class_name for a in list_actors(address=sys.argv[2], filters=[("state", "=", "ALIVE")],
                                           raise_on_missing_output=False)
          if "Train" in a.class_name or a.class_name == "PlacementGroupCleaner"]
groups = [g["state"] for g in ray.util.placement_group_table().values()]
print(json.dumps({"actors": actors, "groups": groups}))
"""


def leftovers(head, tmp_path) -> dict:
    # the state API is asked at the head's dashboard: "auto" would find any other cluster on the machine
    result = subprocess.run([sys.executable, "-c", LEFT, head.address, head.dashboard_url], cwd="/", env=driver_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.recovery
def test_a_killed_drivers_train_run_leaves_nothing_running(head, tmp_path):
    """Train's controller is owned by the driver: when the driver is killed, the Train workers and
    their placement group are released (nothing keeps holding the cluster's resources)."""
    marker = tmp_path / "worker_up"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path / "out"), str(marker), "--address", head.address],
                            cwd="/", env=driver_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "wb"))
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "the Train worker did not start"
            time.sleep(0.5)
        running = leftovers(head, tmp_path)
        assert "PlacementGroupCleaner" in running["actors"] and "CREATED" in running["groups"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The Train workers and their placement group go with the driver. Ray's detached
    # PlacementGroupCleaner may outlive it (it polls the dead controller: Ray's behaviour, described
    # in docs/cluster.md); it holds no resources once the group is removed.
    deadline = time.time() + 120
    while set((left := leftovers(head, tmp_path))["actors"]) - {"PlacementGroupCleaner"} or set(left["groups"]) - {"REMOVED"}:
        assert time.time() < deadline, f"still alive 120 s after the driver was killed: {left}"
        time.sleep(3)


def test_a_submitted_job_runs_its_working_dir_without_a_second_copy(head, tmp_path):
    submit = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.dashboard_url,
              "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": ["runs", ".venv", ".git"]}),
              "--", sys.executable, "tests/ray/attach_probe.py", "/tmp/unused"]
    env = {k: v for k, v in driver_env(tmp_path).items() if k != "PYTHONPATH"}
    result = subprocess.run(submit, cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    seen = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    assert seen["mode"] == "address" and seen["resources"].get(MARK) == 1  # RAY_ADDRESS from the job
    remote = seen["remote"]
    assert Path(remote["file"]).is_relative_to(head.temp_dir) and "working_dir_files" in remote["file"], remote["file"]
    assert remote["source"] == (ROOT / "cram_ray/pipeline/ray_cluster.py").read_text()
