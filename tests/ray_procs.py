"""Separate Ray clusters for tests: a ``ray start --head`` node, extra ``ray start --address`` nodes, stop by pid.

Every node listens on 127.0.0.1 only, on ports picked free at start (never Ray's defaults, so a
test cluster cannot collide with, or be mistaken for, another cluster on the machine) and keeps
its sessions in a temp dir of its own. Each node runs as ``ray start --block`` in a new process
group: stopping it signals that group, then kills by pid whatever process still names the
node's temp dir on its command line (a raylet's workers), so nothing outlives the test.

Token auth is set explicitly either way: ``token=False`` pins ``RAY_AUTH_MODE=disabled`` (a
``~/.ray/auth_token`` left by another run would otherwise switch ``ray start`` to token mode),
``token=True`` writes a 0600 token file in the node's temp dir and :meth:`RayNode.client_env`
gives what a driver needs to connect.

Ray commands here must run under the machine-wide lock (``flock /tmp/cram-ray.lock pytest ...``).
Within one test session (``pytest -n 2`` runs test files in parallel processes) a node is started
under :data:`LAUNCH_LOCK`, from picking its free ports until it has bound them, so two processes
never pick the same port.

    head = start_head(tmp_path, num_cpus=2)
    worker = add_worker(head, tmp_path, num_cpus=2, resources={"GPU_SLOT": 1})
    try:
        subprocess.run([... "--address", head.address], env={**os.environ, **head.client_env()})
    finally:
        stop(worker, head)
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from filelock import FileLock

RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0


@dataclass
class RayNode:
    """One ``ray start --block`` process and what a client needs to reach it."""

    proc: subprocess.Popen
    temp_dir: Path  # Ray's --temp-dir for this node (short: Unix socket paths are limited to 107 bytes)
    log: Path  # stdout and stderr of ``ray start``
    ports: dict[str, int]
    head: bool
    address: str  # GCS address of the cluster, what ``ray.init(address=...)`` / ``--address`` take
    token_file: Optional[Path] = None
    env: dict[str, str] = field(default_factory=dict)  # the environment ``ray start`` ran with

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def dashboard_url(self) -> Optional[str]:
        """The head's dashboard (job submission API), None on worker nodes or without a dashboard."""
        port = self.ports.get("dashboard-port")
        return f"http://{LOOPBACK}:{port}" if port else None

    def client_env(self) -> dict[str, str]:
        """Environment variables a driver sets to connect to this cluster with ``--address``."""
        keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
        return {k: self.env[k] for k in keys if k in self.env}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on the loopback right now (the caller holds the Ray lock)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int, tries: int = 50) -> int:
    """First port of ``width`` consecutive ports free on the loopback (for --min/--max-worker-port)."""
    for _ in range(tries):
        start = 20000 + secrets.randbelow(30000)
        socks = []
        try:
            for port in range(start, start + width):
                s = socket.socket()
                s.bind((LOOPBACK, port))
                socks.append(s)
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {width} consecutive free ports found")


NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")


LAUNCH_LOCK = Path(tempfile.gettempdir()) / "cram-ray-tests-launch.lock"


def _launch(tmp: Path, name: str, args: list[str], **kwargs) -> RayNode:
    with FileLock(str(LAUNCH_LOCK)):
        return _launch_locked(tmp, name, args, **kwargs)


def _launch_locked(tmp: Path, name: str, args: list[str], *, head: bool, num_cpus: float,
                   resources: Optional[dict[str, float]], worker_ports: int, token: Optional[bool],
                   base_env: Optional[dict[str, str]], address: Optional[str]) -> RayNode:
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))
    names = (HEAD_PORTS if head else ()) + NODE_PORTS
    ports = dict(zip(names, free_ports(len(names))))
    first = free_port_range(worker_ports)
    ports.update({"min-worker-port": first, "max-worker-port": first + worker_ports - 1})

    env = {k: v for k, v in (base_env if base_env is not None else os.environ).items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"]) if token is None and "RAY_AUTH_TOKEN_PATH" in env else None
    if token:
        token_file = temp_dir / "auth_token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    elif token is not None:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.pop("RAY_AUTH_TOKEN", None)

    argv = [RAY, "start", "--block", *args, f"--node-ip-address={LOOPBACK}", f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    argv += [f"--{k}={v}" for k, v in ports.items()]
    if resources:
        argv.append(f"--resources={json.dumps(resources)}")
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    node = RayNode(proc=proc, temp_dir=temp_dir, log=log, ports=ports, head=head,
                   address=address or f"{LOOPBACK}:{ports['port']}", token_file=token_file, env=env)
    # `ray start` writes the cluster address into its temp dir once the node is up
    marker = temp_dir / "ray_current_cluster"
    deadline = time.time() + START_TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            stop(node)
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start ({name}) did not come up (exit {proc.poll()}):\n{tail}")
        time.sleep(0.2)
    return node


def start_head(tmp: Path, *, num_cpus: float = 2, resources: Optional[dict[str, float]] = None,
               dashboard: bool = True, token: bool = False, worker_ports: int = 40,
               env: Optional[dict[str, str]] = None, name: str = "head") -> RayNode:
    """A head node on the loopback: GCS, dashboard (job API) and client server on free ports."""
    args = ["--head", "--dashboard-host=127.0.0.1", f"--include-dashboard={str(dashboard).lower()}"]
    return _launch(tmp, name, args, head=True, num_cpus=num_cpus, resources=resources,
                   worker_ports=worker_ports, token=token, base_env=env, address=None)


def add_worker(head: RayNode, tmp: Path, *, num_cpus: float = 2, resources: Optional[dict[str, float]] = None,
               worker_ports: int = 40, name: Optional[str] = None) -> RayNode:
    """A second (third, ...) node joining ``head`` with ``ray start --address``, as on another machine."""
    name = name or f"worker{secrets.token_hex(2)}"
    # token=None: the head's environment already pins its auth mode (and token file)
    return _launch(tmp, name, [f"--address={head.address}"], head=False, num_cpus=num_cpus, resources=resources,
                   worker_ports=worker_ports, token=None, base_env=head.env, address=head.address)


def pids_of(node: RayNode) -> list[int]:
    """Live processes of the node: in its process group, or naming its temp dir on the command line
    (Ray renames most of its processes, ``ray::IDLE`` etc., so the group is the main handle)."""
    needle = str(node.temp_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            # field 5 of stat is the process group; the command name before it may contain spaces
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z" and (int(stat[2]) == node.proc.pid or needle in (entry / "cmdline").read_bytes()):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def stop(*nodes: RayNode) -> None:
    """Stop nodes (pass workers before their head): SIGTERM each node's group, then SIGKILL leftovers by pid."""
    for node in nodes:
        try:
            os.killpg(node.proc.pid, signal.SIGTERM)  # the group outlives its leader if it exited first
        except ProcessLookupError:
            pass
        try:
            node.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait()
        deadline = time.time() + STOP_TIMEOUT
        while pids_of(node) and time.time() < deadline:
            time.sleep(0.5)
        for pid in pids_of(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(node.temp_dir, ignore_errors=True)
