"""What a stream prints under Ray: the project's own lines once each, Ray's chatter in a file.

Without this, a run's console is mostly Ray talking: every ``print`` of a Train worker shows twice
(Ray Train's worker redirects ``print`` into its logger, whose console handler writes it, and tees it
to the worker's redirected stdout as well), and the project's lines sit between dozens of Ray's own
messages (placement-group monitors, raylet worker-count warnings, Ray Data and DeepSpeed notices).

* :func:`ray_init_options` -- keyword arguments for ``ray.init``: Train's print redirection off in the
  job's workers (an environment variable in the job's runtime env, merged with a submitted job's),
  and the workers' Python loggers at WARNING (``ray.LoggingConfig``).
* :func:`route_ray_output` -- after ``ray.init``: of the lines Ray streams from workers to the
  driver, the project's (``[task 3/8 ocr] ...``, ``[base] ...``) and errors (a batch that contains a
  traceback or an error) go to the console; every line goes to ``<run output>/logs/ray.log`` when
  :func:`set_log_dir` named one (Ray keeps its own copy under ``/tmp/ray/session_latest/logs``).
  The driver's own ``ray`` loggers write to the same file, and to the console only at ERROR.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
WORKER_LOG_LEVEL = "WARNING"
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


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` (see the module docstring). Call it as the argument of
    ``ray.init``: it also sends the driver's ``ray`` loggers to the log file from here on, so
    what ``ray.init`` itself says lands there too."""
    import ray

    _route_driver_loggers()
    return {
        "log_to_driver": True,
        "logging_config": ray.LoggingConfig(log_level=WORKER_LOG_LEVEL),
        "runtime_env": {"env_vars": {PRINT_PATCH_ENV: "0"}},
    }


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


def route_ray_output() -> None:
    """After ``ray.init``: filter the worker output Ray prints on this driver (idempotent; a no-op
    when ``ray.init`` was told not to stream worker output)."""
    from ray._private import worker as ray_worker  # Ray offers no public hook on the lines it streams

    _route_driver_loggers()
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    with dispatcher._lock:
        # same name: ray.shutdown() removes the handler by it
        dispatcher.handlers = [
            (name, fn if name != RAY_HANDLER or getattr(fn, "filtered", False) else filtered_printer(fn))
            for name, fn in dispatcher.handlers
        ]
