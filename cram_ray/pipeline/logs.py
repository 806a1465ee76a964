"""What a stream prints under Ray: the project's own lines once each, Ray's chatter in a file.

Without this, a run's console is mostly Ray talking: every ``print`` of a Train worker shows twice
(Ray Train's worker redirects ``print`` into its logger, whose console handler writes it, and tees it
to the worker's redirected stdout as well), and the project's lines sit between dozens of Ray's own
messages (placement-group monitors, raylet worker-count warnings, Ray Data and DeepSpeed notices).

* :func:`ray_init_options` -- keyword arguments for ``ray.init``: Train's print redirection off in the
  job's workers (an environment variable in the job's runtime env, merged with a submitted job's).
  (``ray.LoggingConfig`` is not used: it replaces the driver's own root and ``ray`` handlers.)
* :func:`route_ray_output` -- after ``ray.init``: of the lines Ray streams from workers to the
  driver, the project's (``[task 3/8 ocr] ...``, ``[base] ...``) and errors (a batch that contains a
  traceback or an error) go to the console; every line goes to ``<run output>/logs/ray.log`` when
  :func:`set_log_dir` named one (Ray keeps its own copy under ``/tmp/ray/session_latest/logs``).
  Of the raylet's messages, warnings (e.g. how many worker processes it started) go to the file
  only; everything else it reports (a worker killed, out of memory) stays on the console. The
  driver's own ``ray`` loggers write to the same file, and to the console only at ERROR.

Ray has no public hook on the lines it relays to the driver, so the filter wraps the relay
functions of ``ray._private.worker`` (checked against Ray 2.60); if they move, output is Ray's.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
LOG_NAME = "ray.log"
# the prefixes the project's own lines start with
PROJECT_LINE = re.compile(r"^\[(task \d+/\d+ |base\]|ray\]|data\]|stream\]|fault\]|bench\]|tune\]|compare\])")
ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|\b\w*Error\b|\bERROR\b|\bException\b")
RAY_HANDLER = "ray_print_logs"  # the name ray.init gives its worker-output printer

_state: dict[str, Any] = {"dir": None, "file": None}
_lock = threading.Lock()


def set_log_dir(directory: Optional[Path]) -> None:
    """Where Ray's messages of this run go (``<dir>/ray.log``); None: only Ray's session logs."""
    _state["dir"] = Path(directory) if directory is not None else None


def log_file() -> Optional[Path]:
    """The file Ray's messages go to, or None."""
    return _state["dir"] / LOG_NAME if _state["dir"] is not None else None


def ray_init_options(runtime_env: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` (see the module docstring), ``runtime_env`` extended with
    the variable that keeps Train workers' prints single. Call it as the argument of ``ray.init``:
    it also sends the driver's ``ray`` loggers to the log file from here on, so what ``ray.init``
    itself says lands there too."""
    _route_driver_loggers()
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), PRINT_PATCH_ENV: "0"}
    return {"log_to_driver": True, "runtime_env": env}


def _write(lines: list[str]) -> None:
    path = log_file()
    if path is None or not lines:
        return
    with _lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def split_batch(lines: list[str]) -> tuple[list[str], bool]:
    """``(project lines, whether the batch reports an error)`` of one batch of a worker's output."""
    return [ln for ln in lines if PROJECT_LINE.match(ln)], any(ERROR_LINE.search(ln) for ln in lines)


def filtered_printer(ray_printer: Callable[[dict], None]) -> Callable[[dict], None]:
    """A worker-output handler: every line to the log file; to the console the project's lines,
    and a batch that reports an error as Ray prints it (with its process prefix)."""

    def handle(data: dict) -> None:
        lines = list(data.get("lines") or [])
        who = data.get("actor_name") or data.get("task_name") or ""
        _write([f"({who} pid={data.get('pid')}) {ln}" for ln in lines])
        ours, error = split_batch(lines)
        if error:
            ray_printer(data)
            return
        for ln in ours:
            print(ln, file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)

    handle.filtered = True  # type: ignore[attr-defined]
    return handle


class _ToFile(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _write([self.format(record)])


def _route_driver_loggers() -> None:
    # Tune's progress table stays on the console: a study's user watches it
    for name in ("ray", "ray.data", "ray.train"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        if (name == "ray" or not logger.propagate) and not any(isinstance(h, _ToFile) for h in logger.handlers):
            to_file = _ToFile(logging.INFO)
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(to_file)


def raylet_printer(ray_printer: Callable[..., None]) -> Callable[..., None]:
    """The raylet's messages: warnings to the log file only, anything else as Ray prints it."""

    def handle(data: dict, *args: Any, **kwargs: Any) -> None:
        lines = list(data.get("lines") or [])
        if data.get("pid") == "raylet" and lines and all(ln.lstrip().startswith("WARNING") for ln in lines):
            _write([f"(raylet) {ln}" for ln in lines])
            return
        ray_printer(data, *args, **kwargs)

    handle.filtered = True  # type: ignore[attr-defined]
    return handle


def route_ray_output() -> None:
    """After ``ray.init``: filter what Ray relays to this driver (idempotent; worker output is only
    relayed when ``ray.init`` was asked to)."""
    from ray._private import worker as ray_worker

    _route_driver_loggers()
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    with dispatcher._lock:
        # same name: ray.shutdown() removes the handler by it
        dispatcher.handlers = [
            (name, fn if name != RAY_HANDLER or getattr(fn, "filtered", False) else filtered_printer(fn))
            for name, fn in dispatcher.handlers
        ]
    # the raylet's error channel calls this module-level function by name
    if not getattr(ray_worker.print_to_stdstream, "filtered", False):
        ray_worker.print_to_stdstream = raylet_printer(ray_worker.print_to_stdstream)
