"""CRAM: semantic groups, centroid router, adaptive-rank allocation, decoupling penalty. No Ray here.

The method class lives in :mod:`cram_ray.methods.cram.method` (imported lazily by the registry).
"""
