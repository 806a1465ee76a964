"""Write the bytecode of the modules a stream's processes import: ``python -m cram_ray.precompile``.

``make`` installs with ``pip install --no-compile`` (pip would otherwise compile every module of
every package, ~25,000 files, minutes on two cores) and then runs this: one import of what the
driver, the Train worker, Ray Data, MLflow, DeepSpeed and Ray's dashboard load, with bytecode
writing on even where ``PYTHONDONTWRITEBYTECODE`` is set, so no later process compiles them again.
Modules outside this list are compiled by the first process that imports them (or every time, with
``PYTHONDONTWRITEBYTECODE``). ``workflows/bench.py install`` measures the three ways side by side.
"""
from __future__ import annotations

import importlib
import sys
import time

# what the processes of a Ray stream import: the driver, the Train worker and its methods, Ray Data,
# MLflow, DeepSpeed, and Ray's own dashboard (its agent runs on every node)
STREAM_IMPORTS = ("cram_ray.pipeline.run", "cram_ray.pipeline.ray_executor", "cram_ray.train.worker",
                  "cram_ray.methods", "ray.train.torch", "ray.data", "ray.dashboard.dashboard", "mlflow",
                  "deepspeed")


def precompile(modules: tuple[str, ...] = STREAM_IMPORTS) -> list[str]:
    """Import ``modules`` with bytecode writing on (the process's setting is restored after); returns
    those that are not installed (an extra left out), which are skipped."""
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    missing = []
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if not (err.name and name.startswith(err.name.split(".")[0])):
                    raise
                missing.append(name)
    finally:
        sys.dont_write_bytecode = before
    return missing


def main(argv: list[str]) -> int:
    """``python -m cram_ray.precompile [module ...]`` (default: the stream's modules); the file also
    runs as a script, in an environment without cram_ray."""
    t0 = time.perf_counter()
    missing = precompile(tuple(argv) or STREAM_IMPORTS)
    skipped = f"; not installed, skipped: {', '.join(missing)}" if missing else ""
    print(f"bytecode of the stream's modules written in {time.perf_counter() - t0:.1f} s{skipped}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
