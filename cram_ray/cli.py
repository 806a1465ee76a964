"""What the workflow scripts share: config resolution from flags, and one-line failures."""
from __future__ import annotations

import argparse
import errno
import functools
import re
import sys
from pathlib import Path
from typing import Callable

from cram_ray.config import ConfigError, StreamConfig, environment_problems, load_config
from cram_ray.data.records import DataError, printable
from cram_ray.pipeline.ledger import normalize_location
from cram_ray.pipeline.lock import RunLocked


def add_config_flags(parser: argparse.ArgumentParser, *, out: str, out_help: str,
                     executor_help: str = "overrides train.executor") -> argparse.ArgumentParser:
    """The flags :func:`resolve_config` reads, as every workflow script spells them: --config,
    --benchmark, --out, --executor, --address, the repeatable --set, and --dry-run (see :func:`dry_run`)."""
    parser.add_argument("--config", help="YAML preset (default: built-in defaults)")
    parser.add_argument("--benchmark", help="benchmark manifest YAML (default: the built-in benchmark)")
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--executor", choices=["local", "ray"], help=executor_help)
    parser.add_argument("--address", help="Ray cluster to join, GCS host:port (sets train.ray_address; implies "
                        "--executor ray). Default: RAY_ADDRESS if set, else an embedded cluster on 127.0.0.1")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the config and print the plan (tasks, stages, workers, ZeRO, batch, "
                             "per-GPU memory estimate); exit 0 if it fits, 2 if not; nothing runs")
    return parser


def add_restart_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--restart", action="store_true",
                        help="rerun every stage from the data stage, even under a run id that would resume")
    return parser


def resolve_config(args: argparse.Namespace) -> StreamConfig:
    """--config + --set, then the shorthand flags (--benchmark, --method, --executor), then storage."""
    overrides = list(getattr(args, "overrides", []) or [])
    dry = getattr(args, "dry_run", False)
    if getattr(args, "benchmark", None):
        if not dry and not Path(args.benchmark).is_file():
            raise ConfigError(f"--benchmark {args.benchmark}: manifest file not found")
        overrides.append(f"data.benchmark={Path(args.benchmark).resolve()}")
    if getattr(args, "method", None):
        overrides.append(f"method.name={args.method}")
    if getattr(args, "executor", None):
        overrides.append(f"train.executor={args.executor}")
    elif getattr(args, "address", None):  # naming a cluster means running on it
        overrides.append("train.executor=ray")
    cfg = load_config(args.config, overrides)
    if getattr(args, "address", None):  # verbatim: a YAML parse could read host:port as a number
        cfg = cfg.replace(**{"train.ray_address": args.address})
    if not cfg.storage and getattr(args, "out", None):
        cfg = cfg.replace(**{"storage": normalize_location(args.out)})
    from cram_ray.methods import make_method  # validate the method name before any work

    make_method(cfg)
    if not dry:  # a dry run lists these as warnings instead
        problems = environment_problems(cfg)
        if problems:
            raise ConfigError(problems[0])
        from cram_ray.models.vlm import check_target_modules

        check_target_modules(cfg)
    return cfg


def dry_run(cfg: StreamConfig, *, runs: int = 1) -> int:
    """Print the plan of ``runs`` streams of ``cfg`` (see cram_ray/plan.py); 0 if it fits, 2 if not."""
    from cram_ray.plan import make_plan

    plan = make_plan(cfg, runs=runs)
    print(plan.render(), flush=True)
    if plan.error:
        print(f"error: {plan.error}", file=sys.stderr)
        return 2
    return 0


# the optional dependencies (pyproject.toml extras) by the module a missing one fails to import
EXTRA_OF_MODULE = {"ray": "ray", "deepspeed": "deepspeed", "optuna": "tune", "sklearn": "builtin",
                   "mlxtend": "builtin", "vega_datasets": "builtin", "fastapi": "serve", "python_multipart": "serve"}


# an operating-system failure a user can fix, and what to do; a rerun of the same command then
# continues where it stopped (no stage is marked done before its files are written)
_RERUN = "then rerun the same command to continue"
OS_ADVICE = {
    errno.ENOSPC: f"no space left on the device; free some space, {_RERUN}",
    errno.EDQUOT: f"disk quota exceeded; free some space, {_RERUN}",
    errno.EROFS: f"read-only file system; point --out at a writable place (or remount it), {_RERUN}",
    errno.EACCES: f"permission denied; make it writable for this user or choose another --out, {_RERUN}",
    errno.EPERM: f"operation not permitted; make it writable for this user or choose another --out, {_RERUN}",
    errno.ENOTDIR: f"a file stands where a directory is expected; move it away or choose another --out, {_RERUN}",
    errno.EISDIR: f"a directory stands where a file is expected; move it away or choose another --out, {_RERUN}",
}


def _linked(err: BaseException) -> list[BaseException]:
    """The exceptions ``err`` carries: Python's chain, Ray's ``cause`` (the worker's own exception
    inside a RayTaskError) and Ray Train's per-worker failures."""
    found = [getattr(err, "cause", None), err.__cause__, err.__context__]
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict):
        found.extend(failures.values())
    return [e for e in found if isinstance(e, BaseException)]


def os_error_line(err: BaseException) -> str | None:
    """One line for an operating-system failure in ``OS_ADVICE``, or None. The deepest such error is
    the cause: later ones come from clean-up on the same full or read-only disk, and a Ray worker's
    error reaches the driver wrapped in Ray's own exceptions."""
    cause, seen, todo = None, set(), [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in OS_ADVICE:
            cause = e
        todo.extend(_linked(e))
    if cause is None:
        return None
    where = cause.filename
    if where is None:  # pyarrow's errors quote the path in their message instead
        quoted = re.search(r"'([^']+)'", str(cause.strerror))
        where = quoted.group(1) if quoted else cause.strerror
    return f"{printable(str(where))}: {OS_ADVICE[cause.errno]}"


def fail_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Bad input, an operating-system failure a user can fix (disk full, read-only, a file where a
    directory belongs), or a missing optional dependency, ends the program with one clear line on
    stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataError, RunLocked) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except FileNotFoundError as err:
            print(f"error: {printable(str(err.filename or err))}: file not found", file=sys.stderr)
            return 2
        except OSError as err:
            line = os_error_line(err)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as err:
            extra = EXTRA_OF_MODULE.get((err.name or "").split(".")[0])
            if extra is None:
                raise
            print(f"error: this needs {err.name}, which the core install leaves out: pip install 'cram_ray[{extra}]'",
                  file=sys.stderr)
            return 2
        except Exception as err:  # a Ray task's or Train worker's OS failure, wrapped by Ray
            line = os_error_line(err)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 2

    return wrapper
