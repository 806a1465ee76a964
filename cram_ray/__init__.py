"""Continual instruction tuning of multimodal LLMs with CRAM, run on Ray."""
import os

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
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

__version__ = "0.1.0"
