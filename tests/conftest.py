"""Shared test settings: offline, few threads, caches inside the test session's temp dirs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache (generated benchmark, base model) shared by every test of the session."""
    return str(tmp_path_factory.mktemp("cram_cache"))


from s3_server import s3_bucket, s3_server  # noqa: E402,F401  (a moto S3 server for any test that asks)
