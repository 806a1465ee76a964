"""The Ray stream reproduces the in-process stream (one worker, same seed), and resumes.

Every discrete output is equal: groups, ranks, routing decisions, predictions, the accuracy
matrix. Float tensors agree closely (max difference within 1% of the tensor's largest value),
not bit for bit: the tiny model's convolutional stem runs oneDNN kernels whose summation order
depends on the batch shape, and a Ray Train worker feeds the vision tower differently sized
batches than the in-process loop does (measured: features differ by 5e-6 on values of order 1).
Adam then divides each element's step by that element's own gradient scale, so an element whose
gradient is near zero can move by a visible fraction of the learning rate. The probe's LoRA B
matrices start at zero and take two steps, so their largest value is about two learning rates
(0.004), and a 5e-6 difference is already 0.14% of it (the largest measured, in a CI run; the
trained experts differ by under 0.01%). A wrong expert, task or batch differs by the order of the values themselves.
"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))

import stream  # noqa: E402
from ray_helpers import STAGES, output_pairs  # noqa: E402

pytestmark = pytest.mark.ray

SMOKE = str(ROOT / "workflows/configs/smoke.yaml")


def _run(out, cache_dir, executor):
    argv = ["--config", SMOKE, "--executor", executor, "--out", str(out), "--run-id", "p",
            "--set", f"data.cache_dir={cache_dir}", "--set", "tracking.enabled=false",
            "--set", "data.builtin.tasks=[count,compose]", "--set", "train.ingest=exact"]
    assert stream.main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def _close(a, b) -> bool:
    """Equal trees, floats within float32 rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-2, abs=1e-6)
    return a == b


def _assert_same_output(a: Path, b: Path) -> None:
    if a.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        ta, tb = load_file(str(a)), load_file(str(b))
        assert ta.keys() == tb.keys(), a
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, (a, k)
            if ta[k].is_floating_point():
                # relative to the tensor's scale: sums of features cancel to near zero in places
                diff, scale = (ta[k] - tb[k]).abs().max().item(), tb[k].abs().max().item()
                assert diff <= 1e-2 * scale + 1e-6, (str(a), k, diff, scale)
            else:
                assert torch.equal(ta[k], tb[k]), (a, k)
    elif a.suffix == ".json":
        assert _close(json.loads(a.read_text()), json.loads(b.read_text())), a
    else:  # predictions: the decoded answers and routing decisions, exactly
        assert a.read_bytes() == b.read_bytes(), a


def test_ray_stream_equals_the_in_process_stream_and_resumes(ray_cluster, tmp_path, cache_dir):
    local = _run(tmp_path / "local", cache_dir, "local")
    on_ray = _run(tmp_path / "ray", cache_dir, "ray")
    assert on_ray["accuracy_matrix"] == local["accuracy_matrix"]
    assert on_ray["routing_confusion"] == local["routing_confusion"]
    assert on_ray["params_added"] == local["params_added"] and on_ray["ranks"] == local["ranks"]
    compared = 0
    for _, _, a, b in output_pairs(tmp_path / "local/p", tmp_path / "ray/p", 2):
        _assert_same_output(a, b)
        compared += 1
    for t in range(2):
        for stage in STAGES:
            ma = json.loads((tmp_path / f"local/p/task_{t}/{stage}/_DONE.json").read_text())["result"]["metrics"]
            mb = json.loads((tmp_path / f"ray/p/task_{t}/{stage}/_DONE.json").read_text())["result"]["metrics"]
            assert _close(ma, mb), (t, stage, ma, mb)
    assert compared == 2 * 4 * 2 + 2  # state files of 4 stages, predictions of evaluate, per task
    # rerun: every marker verifies, nothing is launched (no Train run, no Ray Data pass)
    again = _run(tmp_path / "ray", cache_dir, "ray")
    assert again["stages_run"] == [] and again["accuracy_matrix"] == on_ray["accuracy_matrix"]
