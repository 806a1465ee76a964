"""Shared test settings: offline, few threads, caches inside the test session's temp dirs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


TESTS = Path(__file__).resolve().parent
# `make test` runs `pytest -n 2 --dist loadscope` (pytest-xdist): each scope below runs in one
# process, in order. A scope is a test file, or a whole directory whose tests share an expensive
# session fixture (a finished stream), so that fixture is computed once.
SHARED_SESSION_DIRS = {"reliability", "serving"}
# The longest scopes (minutes each on 2 cores, `--durations` in make test's output) go first, so the
# processes start on them and the short files fill in at the end; the rest keep collection order.
LONG_FIRST = ("test_quick_preset.py", "ray/test_ray_stream.py", "ray/test_fused_train.py",
              "ray/test_stream_run.py", "tune/test_study.py", "serving", "ray/test_attach.py")


def scope_of(path: str) -> str:
    """The scope of a test file, as a path relative to tests/ (a directory's name for a shared one)."""
    rel = Path(path).resolve().relative_to(TESTS)
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SHARED_SESSION_DIRS else rel.as_posix()


def pytest_collection_modifyitems(config, items):
    """The scopes in LONG_FIRST first, each scope's tests together in their collected order."""
    scopes: dict[str, list] = {}
    for item in items:
        scopes.setdefault(scope_of(str(item.path)), []).append(item)
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    ordered = sorted(scopes.items(), key=lambda kv: rank.get(kv[0], len(LONG_FIRST)))  # stable
    items[:] = [item for _, members in ordered for item in members]


def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadscope``, xdist's scheduler with :func:`scope_of` as its scopes, handed out
    in collection order (xdist's default would sort them by their number of tests)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileOrDirectoryScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(str(config.rootpath / nodeid.split("::", 1)[0]))

    config.option.loadscopereorder = False
    return FileOrDirectoryScheduling(config, log)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache (generated benchmark, base model) shared by every test of the session."""
    return str(tmp_path_factory.mktemp("cram_cache"))


from s3_server import s3_bucket, s3_server  # noqa: E402,F401  (a moto S3 server for any test that asks)
