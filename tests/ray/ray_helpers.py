"""Shared by the Ray integration tests (a plain module: conftest modules are not importable by name)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "workflows/configs/smoke.yaml"


def smoke_config(storage: Path, cache_dir: str, *overrides: str):
    from cram_ray.config import load_config

    return load_config(SMOKE, [f"storage={storage}", f"data.cache_dir={cache_dir}", "tracking.enabled=false",
                               "train.executor=ray", *overrides])
