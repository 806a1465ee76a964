"""Where the MLflow store goes: tracking.uri, else MLFLOW_TRACKING_URI, else sqlite beside a local
out, else (URI out) sqlite in the local cache keyed by the out URI, artifacts on the object store."""
from pathlib import Path

from cram_ray.config import load_config
from cram_ray.pipeline.ledger import Storage, normalize_location
from cram_ray.pipeline.outputs import tracking_place


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_local_out_keeps_sqlite_and_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    place = tracking_place(_cfg(tmp_path), Storage(str(tmp_path / "out")))
    assert place.uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert place.artifact_location == (tmp_path / "out" / "mlartifacts").as_uri() and not place.cached


def test_uri_out_gets_a_cached_sqlite_per_location_and_artifacts_in_the_bucket(tmp_path, monkeypatch, s3_bucket):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    a = tracking_place(cfg, Storage(f"{s3_bucket}/run-a"))
    b = tracking_place(cfg, Storage(f"{s3_bucket}/run-b"))
    assert a.cached and a.uri.startswith(f"sqlite:///{tmp_path / 'cache' / 'mlflow'}/") and a.uri != b.uri
    assert a.uri == tracking_place(cfg, Storage(f"{s3_bucket}/run-a/")).uri  # same location, same store
    assert a.artifact_location == f"{s3_bucket}/run-a/mlartifacts"
    assert "no tracking server" in a.describe()


def test_configured_uri_then_environment_win(tmp_path, monkeypatch, s3_bucket):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.cluster:5000")
    out = Storage(f"{s3_bucket}/run")
    server = tracking_place(_cfg(tmp_path), out)
    assert server.uri == "http://mlflow.cluster:5000" and server.artifact_location is None and not server.cached
    own = tracking_place(_cfg(tmp_path, f"tracking.uri=sqlite:///{tmp_path}/t.db"), out)
    assert own.uri == f"sqlite:///{tmp_path}/t.db" and own.local_dir == tmp_path
    assert own.artifact_location == f"{s3_bucket}/run/mlartifacts"
    assert tracking_place(_cfg(tmp_path, "tracking.enabled=false"), out).uri is None


def test_locations_normalize(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_location("s3://bucket/run/") == "s3://bucket/run"
    assert normalize_location("rel/dir") == str(tmp_path / "rel" / "dir")
    assert normalize_location(f"file://{tmp_path}/x") == str(tmp_path / "x")
    local = Storage("rel")
    assert local.local and local.location("a/b") == str(tmp_path / "rel" / "a" / "b")
    assert Path(local.child("a").root) == tmp_path / "rel" / "a"

