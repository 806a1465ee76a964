"""Continual instruction tuning of multimodal LLMs with CRAM, run on Ray."""
import os
from typing import Mapping

# How torch's OpenMP threads (libgomp on Linux) wait at a barrier: libgomp reads it once, when torch
# loads it, so it is set here, before any torch import a cram_ray entry point makes; Ray workers
# started by this process inherit it, and an attached cluster's workers get it through the job's
# runtime_env (pipeline/ray_cluster.py). The default is a bounded spin: a waiting thread spins for
# SPIN_COUNT iterations and then sleeps. Sleeping at once (PASSIVE) makes every small kernel of a
# tiny model pay a futex wake-up: tiny-cpu trained 1.24 times slower than with the bounded spin on
# an idle 2-core machine; spinning without bound (ACTIVE) holds the core a descheduled partner
# needs when more threads than cores are runnable: 2.6 times PASSIVE's time beside two busy
# processes, where the bounded spin took 1.5 times. `bench.py omp` measures them side by side, idle
# and under load (docs/performance.md). A choice the user made (OMP_WAIT_POLICY or GOMP_SPINCOUNT)
# is kept; the Makefile's test targets choose PASSIVE.
SPIN_COUNT = "30000"
OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one set is the user's choice


def omp_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP wait variables for an environment: the ones it sets, else the bounded spin."""
    return {k: environ[k] for k in OMP_ENV if environ.get(k)} or {"GOMP_SPINCOUNT": SPIN_COUNT}


os.environ.update(omp_env(os.environ))

__version__ = "0.1.0"
