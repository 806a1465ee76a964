"""The entry scripts, installed as ``cram_ray.workflows`` with a console script each (pyproject.toml):
``cram-stream``, ``cram-compare``, ``cram-tune``, ``cram-prepare``, ``cram-bench`` run the same
``main`` as ``python workflows/<name>.py``."""
