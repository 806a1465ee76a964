"""The stage ledger: outputs on storage plus a ``_DONE.json`` marker per finished stage.

A stage writes its files into ``<storage>/<run_id>/task_<t>/<stage>/`` and then, atomically, a
marker listing every file with its SHA-256. The set of valid markers is the only truth about
progress: a rerun with the same run id skips every stage whose marker verifies and resumes at the
first that does not. Storage is a local path or any URI pyarrow understands (s3://, gs://, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs

MARKER = "_DONE.json"
STAGES = ("probe", "allocate", "train", "aggregate", "evaluate")


@dataclass
class StageResult:
    """What a stage reports back to the driver (also stored in its marker)."""

    stage: str
    task: int
    metrics: dict[str, Any] = field(default_factory=dict)  # JSON-able numbers and small tables
    seconds: float = 0.0  # wall time of the stage function
    startup_seconds: float = 0.0  # part of it spent starting workers / loading models

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "task": self.task, "metrics": self.metrics,
            "seconds": self.seconds, "startup_seconds": self.startup_seconds,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "StageResult":
        return cls(raw["stage"], int(raw["task"]), raw.get("metrics", {}),
                   float(raw.get("seconds", 0.0)), float(raw.get("startup_seconds", 0.0)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_uri(location: str) -> bool:
    """True for an object-store URI (s3://, gs://, ...); a plain path or file:// is local."""
    return "://" in location and not location.startswith("file://")


def normalize_location(location: str) -> str:
    """A local path (or file://) made absolute; a URI kept as written, without a trailing slash."""
    if is_uri(location):
        return location.rstrip("/")
    path = location[len("file://"):] if location.startswith("file://") else location
    return str(Path(path).expanduser().resolve())


class Storage:
    """A directory tree on a local disk or an object store, addressed by relative paths.

    Everything a run writes goes through one of these: the ledger and stage outputs, summary.json
    and plots, a study's or a comparison's reports. Object stores use pyarrow's filesystems, which
    read the usual credentials and ``AWS_ENDPOINT_URL`` themselves.
    """

    def __init__(self, root: str) -> None:
        root = normalize_location(str(root))
        if is_uri(root):
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.root = root
            self.fs = pafs.LocalFileSystem()
            self.local = True
        self.uri = root

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/")

    def location(self, rel: str = "") -> str:
        """``rel`` as a location other libraries accept: an absolute path, or a URI on the same store."""
        return f"{self.uri}/{rel}".rstrip("/") if rel else self.uri

    def child(self, rel: str) -> "Storage":
        return Storage(self.location(rel))

    def local_path(self, rel: str) -> Optional[Path]:
        """The local directory of ``rel`` if storage is local, else None."""
        return Path(self.path(rel)) if self.local else None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        if self.local:  # Python's error names the path and its errno (pyarrow's has neither for a directory)
            return Path(self.path(rel)).read_bytes()
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.local:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                # a full disk must not be left fuller by the half-written copy
                Path(tmp).unlink(missing_ok=True)
                raise
        else:  # object stores make a single put visible atomically
            with self.fs.open_output_stream(target) as fh:
                fh.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes_atomic(rel, text.encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def put_file(self, local_file: Path, rel: str) -> None:
        """Copy one local file to ``rel`` (overwriting)."""
        if self.local and Path(self.path(rel)) == Path(local_file).resolve():
            return
        self.write_bytes_atomic(rel, Path(local_file).read_bytes())

    def put_dir(self, local_dir: Path, rel: str) -> None:
        """Copy every file of ``local_dir`` to ``rel`` (overwriting)."""
        dest = self.path(rel)
        self.fs.create_dir(dest, recursive=True)
        if self.local and Path(dest).resolve() == Path(local_dir).resolve():
            return
        for src in sorted(Path(local_dir).rglob("*")):
            if src.is_file():
                name = src.relative_to(local_dir).as_posix()
                if self.local:
                    Path(dest, name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, Path(dest, name))
                else:
                    self.fs.create_dir(f"{dest}/{name}".rsplit("/", 1)[0], recursive=True)
                    pafs.copy_files(str(src), f"{dest}/{name}", source_filesystem=pafs.LocalFileSystem(),
                                    destination_filesystem=self.fs)

    def get_dir(self, rel: str, local_dir: Path) -> Path:
        """A local directory holding the files of ``rel`` (the directory itself when local)."""
        if self.local:
            return Path(self.path(rel))
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))
            else:
                self.fs.delete_file(self.path(rel))


def marker_digest(marker: dict[str, Any]) -> str:
    """SHA-256 of a marker's file list and result, so an edited metric or file list is detected
    (a guard against edits and partial writes, not against someone who recomputes the digest)."""
    covered = {"files": marker.get("files"), "result": marker.get("result")}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def well_formed(marker: Any, task: int, stage: str) -> bool:
    """A marker is a dict of ``files`` (name -> hex digest), ``result`` (this stage's StageResult
    JSON) and ``digest``; anything else is treated as absent."""
    if not isinstance(marker, dict) or not isinstance(marker.get("digest"), str):
        return False
    files, result = marker.get("files"), marker.get("result")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return False
    if not isinstance(result, dict) or not isinstance(result.get("metrics", {}), dict):
        return False
    try:
        return result["stage"] == stage and int(result["task"]) == task and float(result.get("seconds", 0.0)) >= 0
    except (KeyError, TypeError, ValueError):
        return False


def stage_rel(run_id: str, task: int, stage: str) -> str:
    """``<run_id>/task_<t>/<stage>``; run-wide steps (task < 0, e.g. data) sit at ``<run_id>/<stage>``."""
    return f"{run_id}/{stage}" if task < 0 else f"{run_id}/task_{task}/{stage}"


class Ledger:
    """Markers of finished stages of one run."""

    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self.run_id = run_id

    def rel(self, task: int, stage: str) -> str:
        return stage_rel(self.run_id, task, stage)

    def commit(self, result: StageResult, local_dir: Path) -> None:
        """Upload a stage's outputs, then write its marker with their checksums (last, atomically)."""
        rel = self.rel(result.task, result.stage)
        files = {
            p.relative_to(local_dir).as_posix(): sha256_file(p)
            for p in sorted(Path(local_dir).rglob("*")) if p.is_file() and p.name != MARKER
        }
        self.storage.put_dir(local_dir, rel)
        marker = {"files": files, "finished_at": time.time(), "result": result.to_json()}
        marker["digest"] = marker_digest(marker)
        self.storage.write_bytes_atomic(f"{rel}/{MARKER}", json.dumps(marker, indent=1).encode())

    def marker(self, task: int, stage: str) -> Optional[dict[str, Any]]:
        """The stage's marker if it exists, has the marker's shape, and its digest covers its content."""
        rel = f"{self.rel(task, stage)}/{MARKER}"
        if not self.storage.exists(rel):
            return None
        try:
            marker = json.loads(self.storage.read_bytes(rel))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None
        if not well_formed(marker, task, stage) or marker["digest"] != marker_digest(marker):
            return None
        return marker

    def verify(self, task: int, stage: str) -> Optional[StageResult]:
        """The stage's result if its marker is intact and every listed file matches its checksum;
        None (the stage reruns) for a missing, malformed, edited or stale marker."""
        marker = self.marker(task, stage)
        if marker is None:
            return None
        rel = self.rel(task, stage)
        for name, digest in marker.get("files", {}).items():
            if not self.storage.exists(f"{rel}/{name}"):
                return None
            if hashlib.sha256(self.storage.read_bytes(f"{rel}/{name}")).hexdigest() != digest:
                return None
        return StageResult.from_json(marker["result"])

    def invalidate(self, task: int, stage: str) -> None:
        self.storage.remove(f"{self.rel(task, stage)}/{MARKER}")
