"""Where a run's MLflow store goes, given its output location (a local path or an object-store URI).

In order: ``tracking.uri`` when set; else ``MLFLOW_TRACKING_URI`` when set (a tracking server on a
cluster); else a sqlite file beside a local ``--out`` (``<out>/mlflow.db``). A URI ``--out``
without a server gets a sqlite file in the local cache, one per output location
(``<data.cache_dir>/mlflow/<hash of the URI>/mlflow.db``), because sqlite needs a local file; the
driver copies it to ``<out>/mlflow.db`` when it ends and starts from that copy on a machine whose
cache has none. Run artifacts go to ``<out>/mlartifacts`` (on the object store too: MLflow writes
``s3://`` artifact locations itself) unless a tracking server keeps them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cram_ray.config import StreamConfig, TrackingConfig, config_hash
from cram_ray.pipeline.ledger import Storage

ARTIFACTS_DIR = "mlartifacts"
DB_FILE = "mlflow.db"


def is_server(uri: str) -> bool:
    """A tracking server (http, databricks, ...) keeps its own artifacts; a file store gets ours."""
    return not uri.startswith(("sqlite:", "file:", "/"))


def sqlite_uri(db: Path) -> str:
    """``sqlite:////abs/path/mlflow.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + str(db.expanduser().resolve())


@dataclass
class TrackingPlace:
    uri: Optional[str]  # None: tracking disabled
    artifact_location: Optional[str]  # for a new experiment; None: the server's default
    local_dir: Path  # the directory of a sqlite store (created before MLflow opens it)
    cached: bool  # a sqlite store in the local cache because the output is on an object store

    def tracking(self, cfg: TrackingConfig) -> TrackingConfig:
        return dataclasses.replace(cfg, uri=self.uri)

    def pull(self, out: Storage) -> None:
        """A cached store starts from the copy in ``out`` when this machine has none."""
        db = self.local_dir / DB_FILE
        if self.cached and not db.exists() and out.exists(DB_FILE):
            self.local_dir.mkdir(parents=True, exist_ok=True)
            db.write_bytes(out.read_bytes(DB_FILE))

    def push(self, out: Storage) -> None:
        """A cached store is copied to ``out``, beside the run it records."""
        db = self.local_dir / DB_FILE
        if self.cached and db.exists():
            out.put_file(db, DB_FILE)

    def describe(self) -> str:
        if self.uri is None:
            return "MLflow off"
        where = f"MLflow {self.uri}"
        if self.cached:
            where += " (no tracking server: a sqlite store in this machine's cache, copied to <out>/mlflow.db)"
        return where + (f", artifacts {self.artifact_location}" if self.artifact_location else "")


def tracking_place(cfg: StreamConfig, out: Storage) -> TrackingPlace:
    cache = Path(cfg.data.cache_dir).expanduser() / "mlflow" / config_hash(out.uri)
    if not cfg.tracking.enabled:
        return TrackingPlace(None, None, cache, False)
    artifacts = out.location(ARTIFACTS_DIR)
    if out.local:
        artifacts = Path(artifacts).as_uri()
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        local = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else cache
        return TrackingPlace(uri, None if is_server(uri) else artifacts, local, False)
    if out.local:
        return TrackingPlace(sqlite_uri(Path(out.root) / DB_FILE), artifacts, Path(out.root), False)
    return TrackingPlace(sqlite_uri(cache / DB_FILE), artifacts, cache, True)
