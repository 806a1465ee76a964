"""The run lock: a second driver on the same --out stops at once naming the holder; a dead or
silent holder's lock is taken over. Local directories and S3 (moto) both."""
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cram_ray.pipeline.ledger import Storage
from cram_ray.pipeline.lock import LOCK_FILE, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))

import stream  # noqa: E402


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/run"


def test_second_holder_is_refused_with_the_holders_name(location):
    store = Storage(location)
    with RunLock(store):
        with pytest.raises(RunLocked) as err:
            RunLock(Storage(location)).acquire()
        assert f"host {socket.gethostname()}" in str(err.value) and f"pid {RunLock(store).owner['pid']}" in str(err.value)
        assert location in str(err.value)
    with RunLock(Storage(location)):  # released: the next driver gets it
        pass
    assert not Storage(location).exists(LOCK_FILE)


def test_stream_on_a_locked_run_exits_2_with_one_line(location, capsys):
    with RunLock(Storage(location)):
        assert stream.main(["--executor", "local", "--out", location, "--set", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "in use by host" in err and location in err


def _write_holder(store, **owner):
    store.write_text(LOCK_FILE, json.dumps({"token": "other", "since": time.time(), **owner}))


def test_stale_lock_is_taken_over(s3_bucket):
    store = Storage(f"{s3_bucket}/run")
    # another host whose heartbeat stopped long ago
    _write_holder(store, host="elsewhere", pid=1, heartbeat=time.time() - 1000)
    with RunLock(store, stale_after=60) as lock:
        assert store.read_json(LOCK_FILE)["token"] == lock.owner["token"]
    # another host still beating: refused
    _write_holder(store, host="elsewhere", pid=1, heartbeat=time.time())
    with pytest.raises(RunLocked, match="host elsewhere pid 1"):
        RunLock(store, stale_after=60).acquire()
    # a process of this host that has exited: taken over at once, whatever its heartbeat says
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_holder(store, host=socket.gethostname(), pid=dead.pid, heartbeat=time.time())
    with RunLock(store, stale_after=60):
        pass


def test_heartbeat_keeps_an_object_store_lock_fresh(s3_bucket):
    store = Storage(f"{s3_bucket}/run")
    with RunLock(store, heartbeat=0.2):
        first = store.read_json(LOCK_FILE)["heartbeat"]
        time.sleep(1.0)
        assert store.read_json(LOCK_FILE)["heartbeat"] > first


def test_a_local_lock_dies_with_its_holder(tmp_path):
    """filelock: the OS frees the lock of a killed driver; the next one starts without waiting."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cram_ray.pipeline.ledger import Storage; "
         "from cram_ray.pipeline.lock import RunLock; lock = RunLock(Storage(sys.argv[1])).acquire(); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(Storage(str(tmp_path))).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(Storage(str(tmp_path))):
        pass


def test_a_waiting_driver_gets_the_lock_once_the_holder_releases_it(tmp_path):
    store = Storage(str(tmp_path))
    holder = RunLock(store).acquire()
    threading.Timer(0.5, holder.release).start()
    with RunLock(Storage(str(tmp_path))).acquire(wait=10):
        assert store.read_json(LOCK_FILE)["token"] != holder.owner["token"]
