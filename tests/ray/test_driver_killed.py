"""SIGKILL of a Ray stream's driver mid-task, then the same command: it resumes, no finished stage redone
(the stream's one Train run is relaunched from the first stage left, and holds the next task too)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.recovery]


def test_killed_driver_resumes_without_redoing_finished_stages(tmp_path, cache_dir):
    out = tmp_path / "stream"
    argv = [sys.executable, str(ROOT / "workflows/stream.py"), "--config", str(ROOT / "workflows/configs/smoke.yaml"),
            "--executor", "ray", "--out", str(out), "--run-id", "k", "--set", f"data.cache_dir={cache_dir}",
            "--set", "tracking.enabled=false", "--set", "data.builtin.tasks=[count,classify]",
            # enough train steps that the stages after probe take seconds: the kill must land among them
            "--set", "train.steps_per_task=80"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    # killed once the task's one Train run has committed its first stage, while it runs the others
    probed = out / "k/task_0/probe/_DONE.json"
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while not probed.exists():
            assert proc.poll() is None, "the stream ended before it could be killed"
            assert time.time() < deadline, "task 0 was not probed in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started, no clean shutdown
        proc.wait()
    assert not (out / "summary.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "k/task_0").glob("*/_DONE.json")}
    done = {p.parent.name for p in stamps}
    assert "probe" in done and "evaluate" not in done
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rerun = {s.split("/", 1)[1] for s in summary["stages_run"] if s.startswith("task_0/")}
    assert "evaluate" in rerun and not rerun & done  # what was left, and nothing that had finished
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(summary["accuracy_matrix"]) == 2
    assert {f"task_1/{s}" for s in ("probe", "allocate", "train", "aggregate", "evaluate")} <= set(summary["stages_run"])
