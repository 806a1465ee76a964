"""A benchmark's content identity: one SHA-256 over the manifest and every file it names.

Each file enters the hash under a name relative to its root (``manifest``, ``json/<path from the
manifest's folder>``, ``image/<path under image_root>``) with its own SHA-256, so moving the whole
benchmark keeps its identity and changing one byte of any file changes it. Hashing every image
costs a full read; a small per-benchmark index (path -> size, mtime, SHA-256) in the cache lets the
next run re-hash only the files whose size or mtime changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cram_ray.data.manifest import SPLITS, Benchmark
from cram_ray.pipeline.ledger import sha256_file

# bump whenever the prepared shards of the same files change (schema, image handling)
FORMAT_VERSION = 3
KEY_CHARS = 16  # the hash prefix that names a prepared dataset


@dataclass(frozen=True)
class Identity:
    """What a benchmark is, by content."""

    hash: str  # hex SHA-256 of FORMAT_VERSION and every (name, file SHA-256)
    files: dict[str, str]  # name -> file SHA-256
    paths: dict[str, str]  # name -> the file on this machine (for messages)

    @property
    def key(self) -> str:
        return self.hash[:KEY_CHARS]

    def first_difference(self, old_files: dict[str, str]) -> str:
        """The first file (by name) added, removed or changed relative to ``old_files``."""
        for name in sorted(set(old_files) | set(self.files)):
            if old_files.get(name) != self.files.get(name):
                return self.paths.get(name, name)
        return self.paths["manifest"]


def _named_files(bench: Benchmark) -> dict[str, Path]:
    folder = bench.path.parent
    named = {"manifest": bench.path}

    def name(prefix: str, path: Path, root: Path) -> str:
        # allow_outside_root lets a file sit anywhere: it is then named by its absolute path
        return f"{prefix}/{path.relative_to(root).as_posix() if path.is_relative_to(root) else path}"

    for task in bench.tasks:
        for split in SPLITS:
            named[name("json", task.path(split), folder)] = task.path(split)
            for e in task.entries(split):
                if e.image is not None:
                    named[name("image", Path(e.image), bench.image_root)] = Path(e.image)
    return named


def identify(bench: Benchmark, index_dir: Optional[Path]) -> Identity:
    """The benchmark's :class:`Identity`; ``index_dir`` holds the size/mtime index (None: hash all)."""
    index_path = None
    index: dict[str, list] = {}
    if index_dir is not None:
        index_path = Path(index_dir) / f"{hashlib.sha256(str(bench.path).encode()).hexdigest()[:16]}.json"
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                index = {}  # a damaged index only costs a full re-hash
    files, paths, fresh = {}, {}, {}
    for name, path in _named_files(bench).items():
        st = path.stat()
        known = index.get(str(path))
        if known is not None and known[:2] == [st.st_size, st.st_mtime_ns]:
            digest = known[2]
        else:
            digest = sha256_file(path)
        files[name] = digest
        paths[name] = str(path)
        fresh[str(path)] = [st.st_size, st.st_mtime_ns, digest]
    blob = hashlib.sha256(f"cram_ray benchmark v{FORMAT_VERSION}\n".encode())
    for name in sorted(files):
        blob.update(f"{name}\t{files[name]}\n".encode())
    if index_path is not None and fresh != index:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=index_path.parent, prefix=".index-")
        with os.fdopen(fd, "w") as fh:
            json.dump(fresh, fh)
        os.replace(tmp, index_path)
    return Identity(hash=blob.hexdigest(), files=files, paths=paths)
