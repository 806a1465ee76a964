"""How the driver meets Ray, without starting it: what is shipped, the token file's mode, --address."""
import argparse
import json
import os
import stat

from cram_ray import SPIN_COUNT
from cram_ray.cli import add_config_flags, resolve_config
from cram_ray.pipeline.ray_cluster import PACKAGE_DIR, attach_runtime_env, secure_token_file

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def test_a_plain_driver_ships_its_package_and_the_workers_environment():
    env = attach_runtime_env({"TORCH_EXTENSIONS_DIR": "/opt/ops", "HF_HUB_OFFLINE": "0", "OMP_WAIT_POLICY": "ACTIVE"})
    assert env["py_modules"] == [str(PACKAGE_DIR)] and (PACKAGE_DIR / "pipeline/ray_cluster.py").is_file()
    assert "__pycache__" in env["excludes"]
    # the driver's own choices travel; unset hub switches default to offline
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                               "OMP_WAIT_POLICY": "ACTIVE", "TORCH_EXTENSIONS_DIR": "/opt/ops"}
    # no OpenMP choice on the driver: the workers get the bounded spin (cram_ray/__init__.py)
    assert attach_runtime_env({})["env_vars"]["GOMP_SPINCOUNT"] == SPIN_COUNT
    assert "OMP_WAIT_POLICY" not in attach_runtime_env({})["env_vars"]
    spin = attach_runtime_env({"GOMP_SPINCOUNT": "500"})["env_vars"]
    assert spin["GOMP_SPINCOUNT"] == "500" and "OMP_WAIT_POLICY" not in spin


def test_a_submitted_job_with_a_working_dir_ships_nothing_twice():
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"HF_HUB_OFFLINE": "1"}}}
    env = attach_runtime_env({JOB_ENV: json.dumps(job)})
    assert "py_modules" not in env and "excludes" not in env
    # a key the job sets is left to the job: Ray refuses to merge the same key from both
    assert "HF_HUB_OFFLINE" not in env["env_vars"] and env["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"
    bare = attach_runtime_env({JOB_ENV: json.dumps({"runtime_env": {"pip": ["x"]}})})
    assert bare["py_modules"] == [str(PACKAGE_DIR)]


def test_token_file_is_created_owner_only(tmp_path):
    path = tmp_path / "sub" / "auth_token"
    lines = []
    assert secure_token_file(lines.append, {"RAY_AUTH_TOKEN_PATH": str(path)}) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) >= 32
    assert "created" in lines[0]
    token = path.read_text()
    secure_token_file(lines.append, {"RAY_AUTH_TOKEN_PATH": str(path)})
    assert path.read_text() == token and len(lines) == 1  # an existing private token is left alone


def test_a_world_readable_token_is_tightened(tmp_path):
    path = tmp_path / "auth_token"
    path.write_text("t" * 32)
    os.chmod(path, 0o644)
    lines = []
    secure_token_file(lines.append, {"RAY_AUTH_TOKEN_PATH": str(path)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "t" * 32
    assert "readable by others" in lines[0]


def test_no_token_file_without_token_auth(tmp_path):
    path = tmp_path / "auth_token"
    assert secure_token_file(print, {"RAY_AUTH_TOKEN_PATH": str(path), "RAY_AUTH_MODE": "disabled"}) is None
    assert not path.exists()


def parse(*argv):
    parser = add_config_flags(argparse.ArgumentParser(), out="runs/x", out_help="")
    return resolve_config(parser.parse_args(list(argv)))


def test_address_flag_names_the_cluster_verbatim_and_implies_ray(tmp_path):
    cfg = parse("--address", "[::1]:6379", "--out", str(tmp_path))  # not a YAML list: kept as typed
    assert cfg.train.ray_address == "[::1]:6379" and cfg.train.executor == "ray"
    assert parse("--address", "h:1", "--executor", "local", "--out", str(tmp_path)).train.executor == "local"
    assert parse("--out", str(tmp_path)).train.ray_address is None
