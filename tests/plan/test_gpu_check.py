"""workflows/gpu_check.py runs on CPU at tiny shapes: the same random-init hf_llava path, Ray Train
with DeepSpeed ZeRO-2 and gradient checkpointing, two built-in tasks, a full accuracy matrix."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "workflows"))

TINY = ["model.dtype=float32", "train.use_gpu=false", "train.gpu=null", "model.image_size=28", "model.patch_size=14",
        "model.vision_hidden=32", "model.vision_layers=1", "model.vision_heads=2", "model.text_hidden=64",
        "model.text_heads=4", "model.text_intermediate=128", "model.vocab_size=0", "model.max_positions=512",
        "data.max_text_len=48", "data.max_answer_len=6", "data.builtin.test_per_task=16",
        "method.cram.buf_rank=8", "method.cram.rank_min=1", "method.cram.rank_max=4", "train.cpus_per_worker=1"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.cluster
def test_gpu_check_runs_on_cpu_at_tiny_shapes(tmp_path, capsys):
    import gpu_check

    argv = ["--out", str(tmp_path), "--steps", "4"] + [a for kv in TINY for a in ("--set", kv)]
    assert gpu_check.main(argv) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tasks"] == 2 and report["steps"] == 8
    assert len(report["accuracy_matrix"]) == 2 and len(report["accuracy_matrix"][1]) == 2
    assert report["steps_per_second"] > 0 and report["tokens_per_second"] > 0
    assert report["estimated_peak_gib"] > 0 and report["measured_peak_gib"] is None  # no GPU here
    assert "peak GPU memory" in capsys.readouterr().out
