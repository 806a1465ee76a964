"""An advisory lock on a run's output location, so two drivers never write one run at once.

A local ``--out`` is locked with ``filelock`` (``<out>/.lock``): the operating system frees it when
the holder dies, so a crashed run never blocks the next. An object store has no such lock, so the
holder writes ``<out>/_LOCK.json`` (host, pid, a token, a heartbeat time) and rewrites it every
``heartbeat`` seconds from a daemon thread; a lock whose heartbeat is older than ``stale_after``,
or whose holder is a dead process on this host, is taken over. In both cases the holder's
description sits in ``_LOCK.json``, so a refused driver can name it.

The object-store lock is advisory: two drivers started within the same second may both see no
lock (object stores offer no compare-and-swap through pyarrow); after writing, each reads the lock
back and only the one whose token is there proceeds.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from cram_ray.pipeline.ledger import Storage

LOCK_FILE = "_LOCK.json"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0


class RunLocked(RuntimeError):
    """Another driver holds the run's lock."""


def describe(owner: dict[str, Any]) -> str:
    age = time.time() - float(owner.get("heartbeat", owner.get("since", time.time())))
    return (f"host {owner.get('host', '?')} pid {owner.get('pid', '?')} "
            f"(since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(owner.get('since', 0))))}, "
            f"last heartbeat {age:.0f}s ago)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(storage): ...`` holds the lock of the run stored at ``storage``; raises
    :class:`RunLocked` naming the holder if another live driver has it."""

    def __init__(self, storage: Storage, *, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_SECONDS) -> None:
        self.storage = storage
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                      "since": time.time(), "heartbeat": time.time()}
        self._file_lock = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _refuse(self, holder: Optional[dict[str, Any]]) -> RunLocked:
        who = describe(holder) if holder else "another process"
        return RunLocked(f"{self.storage.uri} is in use by {who}; wait for it to finish "
                         f"(lock: {self.storage.location(LOCK_FILE)})")

    def _holder(self) -> Optional[dict[str, Any]]:
        try:
            return self.storage.read_json(LOCK_FILE)
        except (FileNotFoundError, OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_after:
            return True
        return holder.get("host") == self.owner["host"] and not _pid_alive(int(holder.get("pid", -1)))

    def acquire(self, wait: float = 0.0) -> "RunLock":
        """Take the lock; with ``wait`` > 0, retry for that many seconds before giving up (a Tune
        trial restarted while its previous actor is still exiting)."""
        if self.held:
            return self
        deadline = time.time() + wait
        while True:
            try:
                return self._try_acquire()
            except RunLocked:
                if time.time() >= deadline:
                    raise
            time.sleep(min(5.0, max(0.1, deadline - time.time())))

    @property
    def held(self) -> bool:
        return self._file_lock is not None or self._thread is not None

    def _try_acquire(self) -> "RunLock":
        if self.storage.local:
            from filelock import FileLock, Timeout

            self.storage.fs.create_dir(self.storage.root, recursive=True)
            lock = FileLock(self.storage.path(".lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise self._refuse(self._holder()) from None
            self._file_lock = lock
            self.storage.write_text(LOCK_FILE, json.dumps(self.owner))
            return self
        holder = self._holder()
        if holder is not None and holder.get("token") != self.owner["token"] and not self._stale(holder):
            raise self._refuse(holder)
        if holder is not None:
            print(f"[lock] taking over the stale lock of {describe(holder)} on {self.storage.uri}", flush=True)
        self.storage.write_text(LOCK_FILE, json.dumps(self.owner))
        time.sleep(0.5)  # let a driver that wrote at the same moment win or lose visibly
        holder = self._holder()
        if holder is None or holder.get("token") != self.owner["token"]:
            raise self._refuse(holder)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.owner["heartbeat"] = time.time()
            try:
                self.storage.write_text(LOCK_FILE, json.dumps(self.owner))
            except OSError as err:  # a transient store error: the next beat tries again
                print(f"[lock] heartbeat on {self.storage.uri} failed: {err}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            holder = self._holder()
            if holder is not None and holder.get("token") == self.owner["token"]:
                self.storage.remove(LOCK_FILE)
        finally:  # on a disk gone read-only the description stays, but the lock itself must go
            if self._file_lock is not None:
                self._file_lock.release()
                self._file_lock = None

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
