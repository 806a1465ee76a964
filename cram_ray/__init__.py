"""Continual instruction tuning of multimodal LLMs with CRAM, run on Ray."""
import os

# libgomp (torch's OpenMP on Linux) spins at every barrier by default. When more runnable threads
# than cores share a CPU machine (a Train worker beside Ray's own processes, or beside another
# job) a spinning thread holds the core its descheduled partner needs: tiny-cpu training ran 4.5
# times slower than with passive waiting at a load average of 4 on 2 cores (`bench.py omp`,
# docs/performance.md). libgomp reads this when torch loads it, so it is set before any torch
# import a cram_ray entry point makes; Ray workers started by this process inherit it, and an
# attached cluster's workers get it through the job's runtime_env. A value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
