"""Data: records, manifests, the built-in benchmark, shards."""
