"""The real entry point on the smoke preset, in one process: summary contract and resume."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))

import stream  # noqa: E402

SMOKE = str(ROOT / "workflows/configs/smoke.yaml")
SUMMARY_KEYS = {"method", "benchmark", "tasks", "accuracy_matrix", "mft", "mfn", "maa", "bwt",
                "routing_accuracy", "params_added", "params_added_total", "stage_seconds", "mlflow_run_id"}


def _run(out, cache_dir, method, *extra):
    argv = ["--config", SMOKE, "--method", method, "--executor", "local", "--out", str(out), "--run-id", "t",
            "--set", f"data.cache_dir={cache_dir}", "--set", "tracking.enabled=false", *extra]
    assert stream.main(argv) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", ["lora_ft", "cram"])
def test_smoke_stream_writes_the_summary_contract(tmp_path, cache_dir, method):
    summary = _run(tmp_path, cache_dir, method)
    assert SUMMARY_KEYS <= set(summary)
    n = len(summary["tasks"])
    assert n == 3 and summary["method"] == method
    matrix = summary["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2, 3]
    assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
    mft = sum(matrix[i][i] for i in range(n)) / n
    assert summary["mft"] == pytest.approx(mft)
    assert len(summary["params_added"]) == n and summary["params_added_total"] == sum(summary["params_added"])
    assert summary["params_added"][0] > 0
    for stage in ("probe", "allocate", "train", "aggregate", "evaluate"):
        assert stage in summary["stage_seconds"]
    for t in range(n):
        for stage in ("probe", "allocate", "train", "aggregate", "evaluate"):
            assert (tmp_path / "t" / f"task_{t}" / stage / "_DONE.json").is_file()


def test_rerun_resumes_without_redoing_finished_stages(tmp_path, cache_dir):
    first = _run(tmp_path, cache_dir, "lora_ft")
    assert len(first["stages_run"]) == 15
    secs = first["stage_seconds"]
    assert secs["overhead_fraction"] == pytest.approx((secs["wall"] - secs["compute"]) / secs["wall"])
    # losing the last task's evaluation marker: only that stage reruns
    (tmp_path / "t/task_2/evaluate/_DONE.json").unlink()
    second = _run(tmp_path, cache_dir, "lora_ft")
    assert second["stages_run"] == ["task_2/evaluate"]
    # this run's wall time covers one stage, the compute counts fifteen: no overhead figure
    assert second["stage_seconds"]["overhead_fraction"] is None and second["resumed_stages_skipped"] == 14
    assert second["accuracy_matrix"] == first["accuracy_matrix"]
    # corrupting an earlier output reruns from there on, nothing before it
    state = tmp_path / "t/task_1/train/state.safetensors"
    state.write_bytes(state.read_bytes()[:-1] + b"\0")
    third = _run(tmp_path, cache_dir, "lora_ft")
    assert third["stages_run"][0] == "task_1/train"
    assert "task_0/evaluate" not in third["stages_run"] and "task_1/allocate" not in third["stages_run"]


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    assert stream.main(["--config", SMOKE, "--set", "train.lrr=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lrr" in err
    assert stream.main(["--benchmark", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert stream.main(["--method", "nope", "--out", str(tmp_path)]) == 2
    assert "method.name" in capsys.readouterr().err
