"""One local Ray cluster per test module (shut down at its end), and the smoke preset's data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "workflows/configs/smoke.yaml"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="module")
def ray_cluster():
    """An embedded cluster with over-subscribed logical CPUs (2 Train workers + Ray Data on 2 cores)."""
    import ray

    from cram_ray.pipeline.ray_cluster import _quiet_data

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    _quiet_data()
    yield ray
    ray.shutdown()


def smoke_config(storage: Path, cache_dir: str, *overrides: str):
    from cram_ray.config import load_config

    return load_config(SMOKE, [f"storage={storage}", f"data.cache_dir={cache_dir}", "tracking.enabled=false",
                               "train.executor=ray", *overrides])
