"""Attaching the driver to Ray: a named cluster, or an embedded one private to this machine.

A cluster is joined only when named: ``train.ray_address`` (``--address``) or ``RAY_ADDRESS``
(``ray job submit`` sets it for the entrypoint). Nothing else is joined, in particular not a
``ray start`` cluster that happens to run on the same machine (``address="auto"`` would find
another user's cluster and run this code with that cluster's Python path).

Joining, the driver ships its own ``cram_ray`` package to every worker as a ``py_modules``
runtime_env, so workers import exactly the driver's code whatever is installed on the nodes.
Under ``ray job submit --working-dir`` the job already carries the code: nothing is shipped twice.
The environment the workers need (offline hubs, DeepSpeed's op cache) goes along as ``env_vars``.

Otherwise an embedded cluster is started on the loopback interface only, with over-subscribed
logical CPUs: on a 2-core machine, two one-CPU Train workers would otherwise leave Ray Data no CPU
to schedule its read/decode tasks on, and the run hangs (docs/DESIGN.md §9). It lives and dies with the
driver (Ray's reaper ends it when the driver process goes, even on SIGKILL).

Ray >= 2.52 turns token authentication on for clusters started by ``ray.init`` and writes the
token to ``~/.ray/auth_token`` with the process umask (world-readable by default). We create that
file ourselves, mode 0600, before Ray would, and tighten an existing one readable by others.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from cram_ray import omp_env
from cram_ray.config import TrainConfig
from cram_ray.pipeline.logs import ray_init_options, route_ray_output

MIN_LOCAL_CPUS = 4
LOOPBACK = "127.0.0.1"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the cram_ray package this driver runs
# Set on every worker when the driver does not set them: a worker never reaches a model hub.
WORKER_ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Passed on when the driver sets them; unset, the worker keeps its own (fit.py defaults the op cache).
WORKER_ENV_FORWARDED = ("TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM")
SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


def local_cpus(train: TrainConfig) -> int:
    """Logical CPUs of an embedded cluster: room for the Train workers plus Ray Data and stage tasks."""
    cores = os.cpu_count() or 1
    workers = train.max_workers * train.cpus_per_worker
    return int(max(MIN_LOCAL_CPUS, 2 * cores, workers + 2))


def job_runtime_env(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The runtime_env ``ray job submit`` gave this driver's job ({} outside a submitted job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    return json.loads(raw).get("runtime_env") or {}


def attach_runtime_env(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """What ``ray.init`` adds to the job's runtime_env when joining a cluster: the code, unless the
    submitted job already carries it, and the workers' environment variables the job does not set."""
    environ = os.environ if environ is None else environ
    job = job_runtime_env(environ)
    env_vars = {k: environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}
    env_vars.update({k: environ[k] for k in WORKER_ENV_FORWARDED if environ.get(k)})
    env_vars.update(omp_env(environ))  # how torch's OpenMP threads wait: the driver's choice, else the bounded spin
    # Ray refuses to merge a key both the job and ray.init set: the job's value stands
    taken = set(job.get("env_vars") or {})
    runtime_env: dict[str, Any] = {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}}
    if not (job.get("working_dir") or job.get("py_modules")):
        runtime_env["py_modules"] = [str(PACKAGE_DIR)]
        runtime_env["excludes"] = SHIP_EXCLUDES
    return runtime_env


def token_path(environ: Optional[dict[str, str]] = None) -> Path:
    """Where Ray reads the auth token of this user: ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def secure_token_file(log: Callable[[str], None] = print, environ: Optional[dict[str, str]] = None) -> Optional[Path]:
    """Make sure the token file an embedded cluster uses is readable by its owner only.

    Creates it (0600, never through the umask) when token auth is on and no token exists yet;
    takes group/other permissions off an existing one owned by this user. Returns the path."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "token").lower() != "token" or environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path(environ)
    if not path.exists():
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another driver won the race: tighten theirs below
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(generate_new_authentication_token())
            log(f"[ray] created the cluster auth token {path} (mode 0600)")
    info = path.stat()
    if info.st_uid == os.getuid() and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, 0o600)
        log(f"[ray] {path} was readable by others ({stat.filemode(info.st_mode)}): now 0600")
    return path


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Ray resolves 127.0.0.1 to the machine's routable address unless clusters are disabled (as it
    does on macOS and Windows): this scope makes ``ray.init`` keep the embedded node on the loopback,
    in this process and in the processes it spawns."""
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def connect(train: TrainConfig, log: Callable[[str], None] = print) -> str:
    """Initialise Ray once per process; returns how: ``existing`` | ``address`` | ``local``."""
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_data()
    address = train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        options = ray_init_options(attach_runtime_env())
        ray.init(address=address, **options)
        route_ray_output()
        shipped = "the cram_ray package" if "py_modules" in options["runtime_env"] else "nothing (the job's working_dir has it)"
        log(f"[ray] joined the cluster at {address}; code shipped to workers: {shipped}")
        return "address"
    cpus = local_cpus(train)
    secure_token_file(log)
    with loopback_only():
        # address="local": a new cluster, never whatever /tmp/ray/ray_current_cluster names
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **ray_init_options())
    route_ray_output()
    secure_token_file(log)
    log(f"[ray] started an embedded cluster on {LOOPBACK} with {cpus} logical CPUs on {os.cpu_count()} cores "
        "(pass --address or set RAY_ADDRESS to join a cluster)")
    return "local"


def quiet_data() -> None:
    """Ray Data's progress bars flood job logs; stage lines say what is happening instead."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
