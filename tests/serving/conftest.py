"""A finished smoke stream (in-process executor) shared by the serving tests, and image helpers."""
import base64
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))


def png(width: int = 8, height: int = 8, colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# The quick preset's model (the shipped tiny-cpu base), on the smoke preset's three tasks, cut to a
# few steps: unlike the smoke model, whose answers are all empty, it answers in words, so "the same
# answer" compares text as well as routing.
STREAM_SETTINGS = ["data.builtin.tasks=[count,classify,compose]", "data.builtin.train_per_task=64",
                   "data.builtin.test_per_task=16", "train.steps_per_task=30", "tracking.enabled=false"]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, cache_dir):
    """``(out, run_dir)`` of a finished short 3-task stream of CRAM."""
    import stream

    out = tmp_path_factory.mktemp("serve_stream")
    argv = ["--config", str(ROOT / "workflows/configs/quick.yaml"), "--executor", "local", "--out", str(out),
            "--run-id", "s", "--set", f"data.cache_dir={cache_dir}"]
    for item in STREAM_SETTINGS:
        argv += ["--set", item]
    assert stream.main(argv) == 0
    return out, out / "s"


@pytest.fixture(scope="session")
def smoke_manifest(smoke_run):
    """The built-in benchmark manifest the smoke stream was prepared from."""
    from cram_ray.pipeline.driver import benchmark_identity
    from cram_ray.serving.run import find_run, run_context

    ctx = run_context(find_run(str(smoke_run[1])))
    return benchmark_identity(ctx.cfg)[0].path


def evaluation(run_dir: Path, task: int) -> list[dict]:
    """The evaluation stage's stored predictions after ``task``."""
    lines = (run_dir / f"task_{task}" / "evaluate" / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
