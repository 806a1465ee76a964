"""One local Ray cluster per test module, shut down at its end (a test file runs in one pytest process;
under `make test`'s `-n 2` another process may run its own cluster beside it)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="module")
def ray_cluster():
    """An embedded cluster with over-subscribed logical CPUs (2 Train workers + Ray Data on 2 cores)."""
    import ray

    from cram_ray.pipeline.ray_cluster import quiet_data

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    quiet_data()
    yield ray
    ray.shutdown()
