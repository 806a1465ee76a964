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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, cache_dir):
    """``(out, run_dir)`` of a finished 3-task smoke stream of CRAM."""
    import stream

    out = tmp_path_factory.mktemp("serve_stream")
    argv = ["--config", str(ROOT / "workflows/configs/smoke.yaml"), "--executor", "local", "--out", str(out),
            "--run-id", "s", "--set", f"data.cache_dir={cache_dir}", "--set", "tracking.enabled=false"]
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
