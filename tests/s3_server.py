"""A real S3 API on localhost for tests: moto's server mode in a child process.

``tests/conftest.py`` imports the fixtures, so any test may ask for them::

    def test_x(s3_bucket):          # "s3://cram-test/<test name>", a prefix on the moto server
        ...

The session fixture ``s3_server`` starts one server on 127.0.0.1 (a free port) and points every
AWS client in this process and its children at it: ``AWS_ENDPOINT_URL`` (read by boto3, the
AWS SDK under pyarrow's S3FileSystem, and so by Ray and MLflow), fake credentials and a region.
Outside pytest (e.g. a multi-node script) call :func:`start_server` / :func:`stop_server` and
export :func:`client_env` yourself.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

import pytest

BUCKET = "cram-test"


def client_env(endpoint: str) -> dict[str, str]:
    """The environment that sends AWS clients (boto3, pyarrow, Ray, MLflow) to ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no 1-second probe of the instance metadata service
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(timeout: float = 30.0) -> tuple[int, str]:
    """Start ``moto_server`` on 127.0.0.1 at a free port; returns ``(pid, endpoint_url)`` once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode} before answering on {endpoint}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc.pid, endpoint
        except OSError:
            time.sleep(0.2)
    stop_server(proc.pid)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout:.0f}s")


def stop_server(pid: int) -> None:
    """Stop the server started by :func:`start_server` (its own process group, by pid)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.waitpid(pid, os.WNOHANG)
            os.kill(pid, 0)
        except (ChildProcessError, ProcessLookupError):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def create_bucket(endpoint: str, bucket: str = BUCKET) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs(endpoint))
    names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in names:
        s3.create_bucket(Bucket=bucket)


def _boto_kwargs(endpoint: str) -> dict[str, str]:
    env = client_env(endpoint)
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


def list_keys(endpoint: str, uri: str) -> list[str]:
    """Every object key under ``s3://bucket/prefix`` (relative to the prefix), sorted."""
    import boto3

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs(endpoint))
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
    return sorted(keys)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """One moto S3 server for the test session; the process env points AWS clients at it. Yields its URL."""
    pid, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in client_env(endpoint)}
    os.environ.update(client_env(endpoint))
    try:
        create_bucket(endpoint)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_server(pid)


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """``s3://cram-test/<test name>``: a prefix of its own for each test on the session's moto server."""
    return f"s3://{BUCKET}/{re.sub(r'[^A-Za-z0-9_.-]+', '-', request.node.name)}"
