"""The Ray stream reproduces the in-process stream exactly (one worker, same seed), and resumes."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))

import stream  # noqa: E402

pytestmark = pytest.mark.ray

SMOKE = str(ROOT / "workflows/configs/smoke.yaml")
STAGES = ("probe", "allocate", "train", "aggregate", "evaluate")
OUTPUTS = ("state.safetensors", "state.json", "predictions.jsonl")


def _run(out, cache_dir, executor):
    argv = ["--config", SMOKE, "--executor", executor, "--out", str(out), "--run-id", "p",
            "--set", f"data.cache_dir={cache_dir}", "--set", "tracking.enabled=false",
            "--set", "data.builtin.tasks=[count,compose]"]
    assert stream.main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def test_ray_stream_equals_the_in_process_stream_and_resumes(ray_cluster, tmp_path, cache_dir):
    local = _run(tmp_path / "local", cache_dir, "local")
    on_ray = _run(tmp_path / "ray", cache_dir, "ray")
    assert on_ray["accuracy_matrix"] == local["accuracy_matrix"]
    assert on_ray["routing_confusion"] == local["routing_confusion"]
    assert on_ray["params_added"] == local["params_added"] and on_ray["ranks"] == local["ranks"]
    compared = 0
    for t in range(2):
        for stage in STAGES:
            for name in OUTPUTS:
                a, b = tmp_path / f"local/p/task_{t}/{stage}/{name}", tmp_path / f"ray/p/task_{t}/{stage}/{name}"
                assert a.is_file() == b.is_file(), (t, stage, name)
                if a.is_file():
                    assert a.read_bytes() == b.read_bytes(), (t, stage, name)
                    compared += 1
            ma = json.loads((tmp_path / f"local/p/task_{t}/{stage}/_DONE.json").read_text())["result"]["metrics"]
            mb = json.loads((tmp_path / f"ray/p/task_{t}/{stage}/_DONE.json").read_text())["result"]["metrics"]
            assert ma == mb, (t, stage)
    assert compared == 2 * 4 * 2 + 2  # state files of 4 stages, predictions of evaluate, per task
    # rerun: every marker verifies, nothing is launched (no Train run, no Ray Data pass)
    again = _run(tmp_path / "ray", cache_dir, "ray")
    assert again["stages_run"] == [] and again["accuracy_matrix"] == on_ray["accuracy_matrix"]
