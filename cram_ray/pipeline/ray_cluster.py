"""Attaching the driver to Ray: an explicit address, a running cluster, or an embedded local one.

``train.ray_address`` set: connect there. Unset: connect to ``RAY_ADDRESS`` (set by ``ray job
submit``) or a ``ray start`` cluster on this machine (``address="auto"``), else start an embedded
local cluster whose logical CPUs are over-subscribed: on a 2-core machine, two one-CPU Train
workers would otherwise leave Ray Data no CPU to schedule its read/decode tasks on, and the run
hangs (DESIGN §9). Workers find DeepSpeed's op cache through ``TORCH_EXTENSIONS_DIR`` (defaulted
in the worker to a directory inside the Python environment, see cram_ray/train/fit.py).
"""
from __future__ import annotations

import os
from typing import Callable

from cram_ray.config import TrainConfig

MIN_LOCAL_CPUS = 4


def local_cpus(train: TrainConfig) -> int:
    """Logical CPUs of an embedded cluster: room for the Train workers plus Ray Data and stage tasks."""
    cores = os.cpu_count() or 1
    workers = train.max_workers * train.cpus_per_worker
    return int(max(MIN_LOCAL_CPUS, 2 * cores, workers + 2))


def connect(train: TrainConfig, log: Callable[[str], None] = print) -> str:
    """Initialise Ray once per process; returns how: ``existing`` | ``address`` | ``cluster`` | ``local``."""
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_data()
    address = train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log(f"[ray] connected to {address}")
        return "address"
    try:
        ray.init(address="auto", log_to_driver=True)
        log("[ray] connected to the running cluster on this machine")
        return "cluster"
    except ConnectionError:
        pass
    cpus = local_cpus(train)
    # address="local": never attach to whatever cluster /tmp/ray/ray_current_cluster names
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    log(f"[ray] started an embedded local cluster with {cpus} logical CPUs on {os.cpu_count()} cores")
    return "local"


def quiet_data() -> None:
    """Ray Data's progress bars flood job logs; stage lines say what is happening instead."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
