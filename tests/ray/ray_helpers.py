"""Shared by the Ray integration tests (a plain module: conftest modules are not importable by name)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "workflows/configs/smoke.yaml"


def smoke_config(storage: Path, cache_dir: str, *overrides: str):
    from cram_ray.config import load_config

    return load_config(SMOKE, [f"storage={storage}", f"data.cache_dir={cache_dir}", "tracking.enabled=false",
                               "train.executor=ray", *overrides])


STAGES = ("probe", "allocate", "train", "aggregate", "evaluate")
OUTPUTS = ("state.safetensors", "state.json", "predictions.jsonl")  # what a stage may write


def output_pairs(a: Path, b: Path, tasks: int):
    """(task, stage, file in a, file in b) of every output two ledger roots both hold; asserts that
    each output exists in both or in neither."""
    for t in range(tasks):
        for stage in STAGES:
            for name in OUTPUTS:
                fa, fb = a / f"task_{t}/{stage}/{name}", b / f"task_{t}/{stage}/{name}"
                assert fa.is_file() == fb.is_file(), (t, stage, name)
                if fa.is_file():
                    yield t, stage, fa, fb
