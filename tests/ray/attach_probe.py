"""Run by tests/ray/test_attach.py as a user's driver: connect as the workflows do, then print one
JSON line saying how (mode, cluster, node addresses, listening sockets) and what a remote task imported.

    python attach_probe.py OUT [workflow flags such as --address HOST:PORT]
"""
import argparse
import json
import os
import sys

import psutil
import ray

from cram_ray.cli import add_config_flags, resolve_config
from cram_ray.pipeline.ray_cluster import connect


@ray.remote(num_cpus=1)
def where() -> dict:
    import cram_ray.pipeline.ray_cluster as module

    with open(module.__file__) as f:
        source = f.read()
    return {"file": module.__file__, "source": source, "offline": os.environ.get("HF_HUB_OFFLINE"),
            "ip": ray.util.get_node_ip_address()}


def listening() -> list[str]:
    """Addresses the processes this driver started (an embedded cluster's) listen on."""
    ips = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            ips |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return sorted(ips)


def main() -> None:
    parser = add_config_flags(argparse.ArgumentParser(), out=sys.argv[1], out_help="")
    cfg = resolve_config(parser.parse_args(sys.argv[2:]))
    mode = connect(cfg.train, log=lambda line: None)
    print(json.dumps({"mode": mode, "listening": listening(), "resources": ray.cluster_resources(),
                      "remote": ray.get(where.remote()), "gcs": ray.get_runtime_context().gcs_address,
                      "nodes": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]}))


if __name__ == "__main__":
    main()
