"""What the workflow scripts share: config resolution from flags, and one-line failures."""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

from cram_ray.config import ConfigError, StreamConfig, load_config
from cram_ray.data.records import DataError


def add_config_flags(parser: argparse.ArgumentParser, *, out: str, out_help: str,
                     executor_help: str = "overrides train.executor") -> argparse.ArgumentParser:
    """The flags :func:`resolve_config` reads, as every workflow script spells them: --config,
    --benchmark, --out, --executor and the repeatable --set."""
    parser.add_argument("--config", help="YAML preset (default: built-in defaults)")
    parser.add_argument("--benchmark", help="benchmark manifest YAML (default: the built-in benchmark)")
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--executor", choices=["local", "ray"], help=executor_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, e.g. --set train.lr=1e-4 (repeatable)")
    return parser


def resolve_config(args: argparse.Namespace) -> StreamConfig:
    """--config + --set, then the shorthand flags (--benchmark, --method, --executor), then storage."""
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "benchmark", None):
        if not Path(args.benchmark).is_file():
            raise ConfigError(f"--benchmark {args.benchmark}: manifest file not found")
        overrides.append(f"data.benchmark={Path(args.benchmark).resolve()}")
    if getattr(args, "method", None):
        overrides.append(f"method.name={args.method}")
    if getattr(args, "executor", None):
        overrides.append(f"train.executor={args.executor}")
    cfg = load_config(args.config, overrides)
    if not cfg.storage and getattr(args, "out", None):
        cfg = cfg.replace(**{"storage": str(Path(args.out).resolve())})
    from cram_ray.methods import make_method  # validate the method name before any work

    make_method(cfg)
    return cfg


# the optional dependencies (pyproject.toml extras) by the module a missing one fails to import
EXTRA_OF_MODULE = {"ray": "ray", "deepspeed": "deepspeed", "optuna": "tune", "sklearn": "builtin",
                   "mlxtend": "builtin", "vega_datasets": "builtin"}


def fail_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Bad input, or a missing optional dependency, ends the program with one clear line on stderr
    and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except FileNotFoundError as err:
            print(f"error: {err.filename or err}: file not found", file=sys.stderr)
            return 2
        except ModuleNotFoundError as err:
            extra = EXTRA_OF_MODULE.get((err.name or "").split(".")[0])
            if extra is None:
                raise
            print(f"error: this needs {err.name}, which the core install leaves out: pip install 'cram_ray[{extra}]'",
                  file=sys.stderr)
            return 2

    return wrapper
